"""Every paper preset builds its model and trains two steps on a tiny fake ImageFolder."""
import pytest
import torch
from PIL import Image

from bcssl.config import load_config
from bcssl.engine.trainer import train


@pytest.fixture
def fake_imagenet(tmp_path):
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            d = tmp_path / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (80 + 10 * i, 72), (40 * i, 90, 200)).save(d / f"{i}.JPEG")
    return tmp_path / "imagenet"


@pytest.mark.parametrize("preset,model", [("imagenet_bcssl_t_100ep", "bcssl_t"),
                                          ("imagenet_bcssl_t_300ep", "bcssl_t"),
                                          ("imagenet_bcssl_s_300ep", "bcssl_s")])
def test_paper_preset_two_steps(tmp_path, fake_imagenet, preset, model):
    cfg = load_config(preset, [f"data.root={fake_imagenet}", f"run.dir={tmp_path}/runs", "data.workers=0",
                               "data.load_size=64", "crops.global_size=64", "crops.local_size=32",
                               "crops.n_local=2", "train.batch_size=2", "train.epochs=1", "train.amp=none",
                               "train.progress=false", "log.tensorboard=false", "threads=2",
                               "train.log_every_steps=1"])
    # the recipe itself is untouched
    assert cfg.model.name == model and cfg.model.kernel_size == 9 and cfg.model.dw_norm == "bn+ln"
    assert cfg.method.out_dim == 65536 and cfg.method.norm_last_layer is False
    assert cfg.train.epochs == 1 and cfg.data.eval_split == "val"
    res = train(cfg)
    assert res.images_seen == 4  # 4 training images, batch 2: two steps
    lines = (tmp_path / "runs" / cfg.run.name / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"train"' in line]) == 2


@pytest.mark.parametrize("preset", [p for p in __import__("bcssl.config", fromlist=["x"]).list_presets()
                                    if p.startswith(("imagenet_dino", "imagenet_byol", "imagenet_moco", "imagenet_care",
                                                     "fmnist_"))])
def test_comparison_presets_build_their_method(preset):
    from bcssl.methods import create_method

    cfg = load_config(preset)
    with torch.device("meta"):  # the full-size networks, without memory or time
        method = create_method(cfg.method.name, cfg.model, cfg.method)
    assert sum(p.numel() for p in method.student.parameters()) > 0
    assert cfg.method.name in preset or preset.startswith("imagenet_dino")


def test_canvas_sweep_preset_trains_on_canvases(tmp_path, tiny_fmnist):
    cfg = load_config("sweep_canvas", [f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", "train.batch_size=8",
                                       "train.steps=2", "train.progress=false", "log.tensorboard=false", "threads=1"])
    assert cfg.data.name == "fashion_mnist_canvas" and cfg.demo.budget_min is None
    res = train(cfg)
    assert res.images_seen == 16
    from bcssl.engine.runtime import load_run_backbone

    _, backbone, _ = load_run_backbone(res.run_dir)
    # a 64 px view gives the stage maps 224 px ImageNet images give BC-SSL-T, divided by 3.5: 16/8/4/2
    assert backbone.forward_features(torch.zeros(1, 3, 64, 64)).shape[-1] == 2
