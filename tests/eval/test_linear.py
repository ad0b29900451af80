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


def _image_folder_run(tmp_path):
    """A run pre-trained for one epoch on a tiny ImageFolder: 3 classes x 5 train / 3 val images."""
    from PIL import Image

    for split, n in (("train", 5), ("val", 3)):
        for c, colour in (("n01", (200, 30, 30)), ("n02", (30, 30, 200)), ("n03", (30, 200, 30))):
            d = tmp_path / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 36), tuple(max(0, v - 15 * i) for v in colour)).save(d / f"{i}.png")
    cfg = tiny_config(tmp_path, tmp_path / "folder", "data.name=image_folder", "data.eval_split=val",
                      "eval.data.resize_size=36", "eval.data.crop_size=36", "train.epochs=1", "train.batch_size=5", "eval.final_knn=false")
    return train(cfg).run_dir


def test_dino_eval_linear_on_an_image_folder_two_processes_and_resume_after_a_kill(tmp_path, monkeypatch):
    """The default on image folders: augmented (RandomResizedCrop + flip every step), evaluated every
    epoch (best and last), on 2 gloo processes (`--nproc 2`: the 15 images make a last global batch of
    3, split 2 / 1), and a probe killed mid-epoch resumes from its checkpoint to the same weights."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from bcssl.eval import linear as linear_module
    from tests.engine.test_distributed import ENV

    run = Path(_image_folder_run(tmp_path))
    args = ["linear.epochs=2", "linear.batch_size=4", "linear.checkpoint_every_steps=2"]
    proc = subprocess.run([sys.executable, "-m", "bcssl", "eval", "linear", str(run), "--nproc", "2", *args,
                           "--json"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (two["protocol"], two["processes"], two["augment"], two["train_images"]) == ("dino_eval_linear", 2, True, 15)
    saved = json.loads((run / "linear.json").read_text())
    assert saved["protocol"] == "dino_eval_linear" and [h["epoch"] for h in saved["history"]] == [1, 2]
    assert saved["linear_top1"] == saved["history"][-1]["top1"]  # last epoch; best reported apart
    assert saved["best_top1"] == max(h["top1"] for h in saved["history"]) and saved["best_epoch"] in (1, 2)
    w_two = load_linear_classifier(run).weight
    shutil.rmtree(run / "linear")

    one = linear_probe(run, args, progress=False)
    w_one = load_linear_classifier(run).weight
    assert one["processes"] == 1
    # the same global batches and crops; features of 2- vs 4-image batches differ in the last digits
    assert torch.allclose(w_two, w_one, atol=1e-5) and one["history"][-1]["loss"] == pytest.approx(
        two["history"][-1]["loss"], rel=1e-5)
    shutil.rmtree(run / "linear")

    real, calls = linear_module._flip_normalise, {"n": 0}

    def killed_at_step_7(*a, **kw):  # 4 steps per epoch: dies in epoch 2, after the step-6 checkpoint
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(linear_module, "_flip_normalise", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        linear_probe(run, args, progress=False)
    assert torch.load(run / "linear" / "checkpoint.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(linear_module, "_flip_normalise", real)
    resumed = linear_probe(run, args, progress=False)
    assert torch.equal(load_linear_classifier(run).weight, w_one)  # exactly the uninterrupted probe
    assert resumed["history"] == one["history"]
    with pytest.raises(ValueError, match="remove"):  # another recipe on top of this checkpoint
        linear_probe(run, ["linear.epochs=3", "linear.batch_size=4"], progress=False)


def test_probe_crops_come_from_the_original_image_with_torchvision_defaults(tmp_path):
    """DINO's eval_linear trains on transforms.RandomResizedCrop(224) of the decoded image: one box over
    the ORIGINAL image (not the evaluation's centre crop), bilinear (torchvision's default)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from bcssl.data import ImageFolderDataset
    from bcssl.data.crops import crop_seed
    from bcssl.eval.linear import ProbeCrops

    d = tmp_path / "wide" / "c0"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 300, 3), dtype=np.uint8)).save(d / "0.png")  # 5:1, far from square
    ds = ImageFolderDataset(tmp_path / "wide")
    cfg = ProbeCrops(32, (0.08, 1.0))
    lefts, rights = [], []
    for step in range(200):
        item = ds.crop_item(0, crop_seed(0, step, 0), cfg)
        assert len(item.groups) == 2 and item.groups[0].shape == (1, 3, 32, 32) and item.groups[1].shape[0] == 0
        top, left, h, w = item.boxes[0].tolist()
        assert 0.08 * 0.75 <= h * w / (60 * 300) <= 1.0
        lefts.append(left)
        rights.append(left + w)
        with Image.open(d / "0.png") as img:
            ref = TF.resized_crop(img.convert("RGB"), top, left, h, w, [32, 32], InterpolationMode.BILINEAR)
        assert torch.equal(item.groups[0][0], torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    assert min(lefts) < 60 and max(rights) > 240  # the crops reach both ends of the wide image
