"""The written backbone contract (bcssl/models/contract.py): a new backbone family is one class and
one registry line, and CARE, detection, export and CAM run on it without knowing it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bcssl.config import load_config
from bcssl.engine.optim import build_optimizer
from bcssl.eval.cam import cam_maps
from bcssl.eval.detection import build_mask_rcnn, set_drop_path
from bcssl.export import export_backbone, load_backbone
from bcssl.methods import create_method
from bcssl.models import Backbone, StageInfo, create_backbone, register_backbone, registry


class TinyStageNet(Backbone):
    """A family no bcssl code knows: 4 stages of (3x3 stride-2 conv -> BN -> ReLU), average pooling.
    Only the contract's required members; everything else is the base class's default."""

    def __init__(self, width: int = 8, drop_path_rate: float = 0.0):
        super().__init__()
        chans = [width * 2 ** i for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for c_in, c in zip([3] + chans[:-1], chans))
        self.num_features = chans[-1]

    @property
    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(s[0].out_channels, 2 ** (i + 1), f"stages.{i}") for i, s in enumerate(self.stages)]

    def forward_intermediates(self, x):
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return x, maps

    def forward_head(self, final):
        return final.mean(dim=(2, 3))

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.stages[-1]


@pytest.fixture
def tiny_family(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_backbone("tiny_stage_net")  # the one registry line
    def tiny_stage_net(*, width: int = 8, drop_path_rate: float = 0.0, **unused):
        return TinyStageNet(width, drop_path_rate)

    return "tiny_stage_net"


def test_care_trains_a_step_on_a_new_family(tiny_family):
    cfg = load_config(None, [f"model.name={tiny_family}", "method.name=care", "method.care.proj_hidden_dim=32",
                             "method.care.proj_dim=16", "method.care.blocks=2", "method.care.fmap_size=4",
                             "method.care.dim_head=8"])
    method = create_method("care", cfg.model, cfg.method)
    method.setup(steps_per_epoch=2, epochs=1)
    method.train()
    t_in = method.student.encoder.t_stream.net[0].shortcut[0]
    assert (t_in.in_channels, t_in.out_channels) == (32, 64)  # stage map before the last -> last width
    before = [p.detach().clone() for p in method.student.encoder.backbone.parameters()]
    opt = build_optimizer("sgd", method.param_groups(), lr=0.1, weight_decay=1e-4)
    loss, _ = method.loss([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], 0)  # 32 px: stage 3 is 4x4
    loss.backward()
    opt.step()
    method.after_step(0)
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, method.student.encoder.backbone.parameters()))


def test_detection_takes_a_step_on_a_new_family(tiny_family):
    torch.manual_seed(0)
    backbone = create_backbone(tiny_family).fold_bn().train()
    set_drop_path(backbone, 0.2)  # the contract's default: no drop path modules, nothing to set
    model = build_mask_rcnn(backbone, num_classes=3, min_size=64, max_size=64, test_size=64,
                            rpn_post_nms_top_n_train=50, box_batch_size_per_image=16, detections_per_img=5)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[:, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
               for _ in images]
    stage_weight = backbone.stages[0][0].weight
    w0 = stage_weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(images, targets)
    sum(losses.values()).backward()
    opt.step()
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and not torch.equal(stage_weight, w0)
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_export_round_trips_a_new_family(tiny_family, tmp_path, fmt):
    torch.manual_seed(0)
    backbone = create_backbone(tiny_family).eval()
    res = export_backbone(backbone, tmp_path / f"tiny.{fmt}", fmt, model_name=tiny_family, model_kwargs={"width": 8},
                          input_size=32)
    assert res.max_abs_diff <= res.tolerance
    loaded = load_backbone(res.path)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(loaded(x), backbone(x), atol=1e-5)


def test_cam_on_a_new_family(tiny_family):
    torch.manual_seed(0)
    backbone = create_backbone(tiny_family).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for method in ("gradcam", "eigencam"):
        maps = cam_maps(backbone, images, method=method, size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
        assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and maps.max() > 0
