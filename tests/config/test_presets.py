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
                               "crops.global_size=64", "crops.local_size=32",
                               "crops.n_local=2", "train.batch_size=2", "train.epochs=1", "train.amp=none",
                               "train.progress=false", "log.backends=[csv]", "threads=2",
                               "train.log_every_steps=1"])
    # the recipe itself is untouched
    assert cfg.model.name == model and cfg.model.kernel_size == 9 and cfg.model.dw_norm == "bn+ln"
    assert cfg.method.dino.out_dim == 65536 and cfg.method.dino.norm_last_layer is False
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


def test_dino_resnet50_presets_follow_dinos_resnet50_arguments():
    """facebookresearch/dino README ("ResNet-50 and other convnets trainings": --arch resnet50
    --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
    --local_crops_scale 0.05 0.14) with main_dino.py's defaults for everything else."""
    import yaml

    from bcssl.config import preset_path

    cfg = load_config("imagenet_dino_resnet50_300ep")
    written = yaml.safe_load(preset_path("imagenet_dino_resnet50_300ep").read_text())
    # the preset states every released argument itself rather than inheriting it from a ViT recipe
    want_train = dict(optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, weight_decay_end=1e-4,
                      warmup_epochs=10, min_lr=1e-6, clip_grad=3.0)
    want_dino = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, norm_last_layer=True,
                     use_bn_in_head=False, student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.04,
                     warmup_teacher_temp_epochs=0, center_momentum=0.9, momentum_teacher=0.996, freeze_last_layer=1)
    assert {k: written["train"][k] for k in want_train} == want_train
    assert written["method"]["dino"] == want_dino
    assert {k: cfg.train[k] for k in want_train} == want_train
    assert {k: cfg.method.dino[k] for k in want_dino} == want_dino
    assert cfg.method.name == "dino" and cfg.model.name == "resnet50" and not cfg.model.zero_init_last
    assert (list(cfg.crops.global_scale), list(cfg.crops.local_scale), cfg.crops.n_local) == ([0.14, 1.0],
                                                                                              [0.05, 0.14], 8)
    # Table 1 (100 epochs): the paper's own optimiser (AdamW 5e-4, wd 0.04 -> 0.4) wins; DINO's
    # ResNet-50 head, temperatures and crops otherwise
    t1 = load_config("imagenet_dino_resnet50_100ep")
    assert (t1.train.optimizer, t1.train.lr, t1.train.weight_decay, t1.train.weight_decay_end) == ("adamw", 5e-4,
                                                                                                  0.04, 0.4)
    assert (t1.method.dino.norm_last_layer, t1.method.dino.use_bn_in_head) == (True, False)
    assert (t1.method.dino.teacher_temp, t1.method.dino.warmup_teacher_temp_epochs) == (0.04, 0)
    assert list(t1.crops.global_scale) == [0.14, 1.0] and list(t1.crops.local_scale) == [0.05, 0.14]


def test_comparison_presets_follow_their_reference_code():
    moco = load_config("imagenet_moco_v3_vit_s16_300ep")  # moco-v3 CONFIG.md, ViT-Small
    assert moco.model.name == "vit_s16_mocov3" and moco.method.moco_v3.stop_grad_conv1
    assert (moco.method.moco_v3.temperature, moco.method.moco_v3.momentum) == (0.2, 0.99)
    assert (moco.train.optimizer, moco.train.lr, moco.train.weight_decay, moco.train.warmup_epochs) == (
        "adamw", 1.5e-4, 0.1, 40)
    care = load_config("imagenet_care_resnet50_100ep")  # CARE care_exp.py
    assert (care.train.optimizer, care.train.lr, care.train.weight_decay, care.train.momentum) == ("sgd", 0.05,
                                                                                                   1e-4, 0.9)
    assert (care.method.care.lambda_fea, care.method.care.fmap_size, care.method.care.momentum) == (100.0, 14, 0.99)
    assert not care.model.zero_init_last  # CARE's ResNet-50: zero_init_residual=False
    byol = load_config("imagenet_byol_resnet50_300ep")
    assert byol.model.zero_init_last and byol.method.byol.momentum == 0.99 and byol.train.optimizer == "lars"


def test_canvas_sweep_preset_trains_on_canvases(tmp_path, tiny_fmnist):
    cfg = load_config("sweep_canvas", [f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", "train.batch_size=8",
                                       "train.steps=2", "train.progress=false", "log.backends=[csv]", "threads=1"])
    assert cfg.data.name == "fashion_mnist_canvas" and cfg.demo.budget_min is None
    res = train(cfg)
    assert res.images_seen == 16
    from bcssl.engine.runtime import load_run_backbone

    _, backbone, _ = load_run_backbone(res.run_dir)
    # a 64 px view gives the stage maps 224 px ImageNet images give BC-SSL-T, divided by 3.5: 16/8/4/2
    assert backbone.forward_features(torch.zeros(1, 3, 64, 64)).shape[-1] == 2


def test_fashion_mnist_presets_keep_the_network_their_results_were_measured_with():
    """The demo trains a narrow network (more images in its budget); the method comparisons and the
    sweeps stay on fmnist_dino's 32-256 network, with which REPRODUCING.md's numbers were measured."""
    for preset in ("fmnist_dino", "fmnist_byol", "fmnist_moco_v3", "fmnist_care", "sweep_fmnist", "sweep_canvas"):
        cfg = load_config(preset)
        assert list(cfg.model.dims) == [32, 64, 128, 256], preset
        assert cfg.demo.budget_min is None, preset  # a fixed length (train.epochs / train.steps)
    for preset, budget in (("demo_fmnist", 15), ("demo_fmnist_long", 60)):
        cfg = load_config(preset)
        assert list(cfg.model.dims) == [8, 16, 32, 64] and cfg.model.kernel_size == 9, preset
        assert (cfg.method.dino.hidden_dim, cfg.method.dino.out_dim) == (256, 1024), preset
        assert cfg.demo.budget_min == budget, preset
    dino = load_config("fmnist_dino").method.dino
    assert (dino.hidden_dim, dino.out_dim, dino.bottleneck_dim) == (512, 2048, 64)
