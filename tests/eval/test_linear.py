"""Linear probe: DINO's recipe (init, lr scaling, cosine, no weight decay) and the run-level probe."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bcssl.config import ConfigError, load_config
from bcssl.engine.runtime import load_run_backbone
from bcssl.engine.trainer import train
from bcssl.eval.features import extract_features
from bcssl.eval.linear import (
    LinearEvalAugment,
    feature_stats,
    fold_normalization,
    linear_probe,
    load_linear_classifier,
    make_classifier,
    topk_accuracy,
    train_linear,
)
from tests.conftest import tiny_config


def clusters(n_per_class=40, C=5, D=16, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g) * 4
    y = torch.arange(C).repeat(n_per_class)
    x = centers[y] + 0.3 * torch.randn(len(y), D, generator=g)
    return x * scale + offset, y


def test_defaults_are_the_paper_recipe():
    lc = load_config().linear
    assert (lc.epochs, lc.lr, lc.batch_size, lc.momentum, lc.weight_decay) == (100, 0.001, 256, 0.9, 0.0)
    assert lc.protocol == "auto" and lc.normalize_features is False and list(lc.crop_scale) == [0.08, 1.0]
    layer = make_classifier(512, 1000)
    assert layer.bias.abs().max() == 0 and abs(layer.weight.std().item() - 0.01) < 5e-4


def test_separable_features_are_learnt_perfectly_and_shuffled_labels_are_not():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(n_per_class=10, seed=0)  # same centres, other noise draw
    test_x = test_x + 0.1 * torch.randn_like(test_x)
    res = train_linear(train_x, train_y, test_x, test_y, 5, epochs=30, batch_size=32)  # default lr 0.001
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["losses"][-1] < res["losses"][0]
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    bad = train_linear(train_x, shuffled, test_x, test_y, 5, epochs=30, batch_size=32)
    assert bad["top1"] < 60.0
    again = train_linear(train_x, train_y, test_x, test_y, 5, epochs=30, batch_size=32)
    assert torch.equal(again["classifier"].weight, res["classifier"].weight)  # seeded: reproducible


def test_lr_is_scaled_by_batch_and_cosine_annealed_per_epoch():
    x, y = clusters(n_per_class=4)
    res = train_linear(x, y, x, y, 5, epochs=10, lr=0.001, batch_size=64)
    lrs = res["lrs"]
    base = 0.001 * 64 / 256
    assert lrs[0] == pytest.approx(base)
    assert lrs[-1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # CosineAnnealingLR, eta_min 0
    assert lrs[5] == pytest.approx(base / 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    # the values equal torch's own scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=0)
    want = []
    for _ in range(10):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(want)


def test_no_weight_decay_by_default():
    x, y = clusters(n_per_class=10, D=8)
    x = torch.cat([x, torch.zeros(len(x), 1)], 1)  # a dead feature: its weights get no gradient
    init = make_classifier(9, 5, seed=0).weight[:, -1]
    out = train_linear(x, y, x, y, 5, epochs=5, lr=1.0, batch_size=16)["classifier"].weight[:, -1]
    assert torch.equal(out, init)  # untouched: no decay
    decayed = train_linear(x, y, x, y, 5, epochs=5, lr=1.0, batch_size=16, weight_decay=0.5)["classifier"].weight[:, -1]
    assert decayed.abs().sum() < 0.5 * init.abs().sum()


def test_normalization_is_folded_into_the_saved_layer():
    x, y = clusters(offset=100.0, scale=50.0)  # badly scaled features
    mean, inv_std = feature_stats(x)
    assert torch.allclose((x - mean) * inv_std, (x - x.mean(0)) / x.std(0, unbiased=False), atol=1e-3)
    layer = make_classifier(16, 5, seed=3)
    with torch.no_grad():
        layer.bias.normal_()
    folded = fold_normalization(layer, mean, inv_std)
    assert torch.allclose(folded(x), layer((x - mean) * inv_std), atol=1e-3)
    res = train_linear(x, y, x, y, 5, epochs=10, batch_size=32, normalize=True)
    assert res["top1"] == 100.0  # reported with the folded layer on raw features
    assert topk_accuracy(res["classifier"], x, y) == (res["top1"], res["top5"])


def test_augment_is_random_resized_crop_and_flip():
    aug = LinearEvalAugment(16, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    img = torch.arange(32, dtype=torch.uint8).repeat(1, 1, 32, 1) * 8  # horizontal ramp, 1 channel
    img = img.repeat(8, 1, 1, 1)
    out = aug(img, seed=0)
    assert out.shape == (8, 3, 16, 16)
    slope = out[:, 0, 8, -2] - out[:, 0, 8, 1]
    assert (slope > 0).any() and (slope < 0).any()  # some images flipped, some not
    assert torch.equal(aug(img, seed=0), out) and not torch.equal(aug(img, seed=1), out)
    crops = LinearEvalAugment(16, (0.5,) * 3, (0.5,) * 3)(img, seed=0)  # scale 0.08-1: crops differ in extent
    assert not torch.allclose(crops[:, 0].amax((1, 2)) - crops[:, 0].amin((1, 2)),
                              out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2)))


@pytest.fixture
def tiny_run(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    return train(cfg).run_dir


def test_linear_probe_on_a_trained_run(tiny_run):
    from pathlib import Path

    run = Path(tiny_run)
    res = linear_probe(run, ["linear.epochs=5", "linear.batch_size=16"], progress=False)
    assert 0 <= res["linear_top1"] <= res["linear_top5"] <= 100
    saved = json.loads((run / "linear.json").read_text())
    for k in ("linear_top1", "linear_top5", "epochs", "lr", "batch_size", "num_classes", "feature_dim", "dataset",
              "train_s"):
        assert saved[k] == res[k], k
    assert (saved["epochs"], saved["batch_size"], saved["num_classes"], saved["feature_dim"]) == (5, 16, 10, 64)
    assert saved["lr"] == pytest.approx(0.001 * 16 / 256) and saved["dataset"] == "fashion_mnist"

    tensors = load_file(str(run / "linear.safetensors"))
    assert set(tensors) == {"weight", "bias"} and tensors["weight"].shape == (10, 64)
    clf = load_linear_classifier(run)
    assert torch.equal(clf.weight, tensors["weight"]) and torch.equal(clf.bias, tensors["bias"])
    # the reloaded classifier on freshly extracted backbone features reproduces the reported accuracy
    cfg, backbone, _ = load_run_backbone(run)
    from bcssl.data import BatchLoader, build_dataset
    test_set = build_dataset("fashion_mnist", root=cfg.data.root, split="test")
    f, y = extract_features(backbone, BatchLoader(test_set, 32, shuffle=False, drop_last=False).epoch(0),
                            size=cfg.crops.global_size, mean=cfg.crops.mean, std=cfg.crops.std, progress=False)
    assert topk_accuracy(clf, f, y)[0] == pytest.approx(res["linear_top1"])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "linear" and records[-1]["top1"] == res["linear_top1"]
    assert records[-1]["step"] == max(r["step"] for r in records[:-1]) == 4
    assert len(list((run / "cache").glob("features-*.pt"))) == 2  # train + test features cached

    again = linear_probe(run, ["linear.epochs=5", "linear.batch_size=16"], progress=False)
    assert again["linear_top1"] == res["linear_top1"]  # cached features, seeded order: identical
    assert saved["protocol"] == "cached_features"  # auto on an in-memory set
    aug = linear_probe(run, ["linear.epochs=1", "linear.batch_size=16", "linear.protocol=dino_eval_linear",
                             "linear.normalize_features=true"], progress=False)
    assert aug["augment"] is True and aug["protocol"] == "dino_eval_linear" and 0 <= aug["linear_top1"] <= 100
    assert load_linear_classifier(run).weight.shape == (10, 64)


def test_errors(tmp_path, tiny_run):
    with pytest.raises(FileNotFoundError, match="bcssl eval linear"):
        load_linear_classifier(tiny_run)
    with pytest.raises(ConfigError, match="linear.epochs"):
        linear_probe(tiny_run, ["linear.epochs=0"], progress=False)
    with pytest.raises(FileNotFoundError, match="not a bcssl run"):
        linear_probe(tmp_path / "nowhere", progress=False)
