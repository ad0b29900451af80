"""BYOL against its formulas (docs/recipe.md section 4; deepmind-research/byol)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcssl.config import load_config
from bcssl.engine.trainer import train
from bcssl.methods import BYOL, create_method
from bcssl.methods.byol import byol_loss, representation_stats
from tests.conftest import TINY_MODEL, tiny_config

TINY_PROJ = ["method.byol.proj_hidden_dim=32", "method.byol.proj_dim=16"]


def tiny_byol(*extra, steps_per_epoch=5, epochs=4):
    cfg = load_config(None, [*TINY_MODEL, "method.name=byol", *TINY_PROJ, *extra])
    method = create_method("byol", cfg.model, cfg.method)
    method.setup(steps_per_epoch, epochs)
    return method


def views(B=4):
    return [torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)]


def test_loss_matches_formula():
    torch.manual_seed(1)
    B, D = 6, 16
    p1, p2, z1, z2 = (torch.randn(B, D) for _ in range(4))
    got = byol_loss(p1, p2, z1, z2)
    # straight from the paper: per sample 2 - 2 cos(p, z'), the two directions summed, batch mean
    want = sum((2 - 2 * torch.dot(p1[b], z2[b]) / (p1[b].norm() * z2[b].norm()))
               + (2 - 2 * torch.dot(p2[b], z1[b]) / (p2[b].norm() * z1[b].norm())) for b in range(B)) / B
    assert torch.allclose(got, want, atol=1e-5)
    # = mean of squared distances between the normalised vectors
    sq = ((F.normalize(p1, dim=1) - F.normalize(z2, dim=1)) ** 2).sum(1) \
        + ((F.normalize(p2, dim=1) - F.normalize(z1, dim=1)) ** 2).sum(1)
    assert torch.allclose(got, sq.mean(), atol=1e-5)
    # each prediction is matched with the *other* view's target
    assert not torch.allclose(got, byol_loss(p1, p2, z2, z1), atol=1e-3)
    assert byol_loss(p1, p2, p2 * 3, p1 * 0.5).abs() < 1e-5  # perfect predictions: 0 (scale-free)


def test_heads_structure():
    method = tiny_byol()
    backbone = method.student.encoder.backbone
    for mlp, (i, h, o) in ((method.student.encoder.projector, (backbone.num_features, 32, 16)),
                           (method.student.predictor, (16, 32, 16))):
        kinds = [type(m) for m in mlp]
        assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert (mlp[0].in_features, mlp[0].out_features, mlp[3].out_features) == (i, h, o)
        assert mlp[0].bias is not None and mlp[3].bias is None  # BYOL's networks.MLP
        assert mlp[1].affine
    # the target has backbone + projector only (no predictor)
    assert not hasattr(method.teacher, "predictor")
    assert method.eval_backbone() is method.student.encoder.backbone  # BYOL keeps the online encoder


def test_target_no_grad_ema_of_parameters_only_and_train_mode():
    method = tiny_byol()
    assert isinstance(method, BYOL)
    method.train()
    for (n, po), pt in zip(method.student.encoder.named_parameters(), method.teacher.parameters()):
        assert torch.equal(po, pt), n
    assert all(not p.requires_grad for p in method.teacher.parameters())
    loss, logs = method.loss(views(), step=0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.predictor.parameters())
    assert all(p.grad is not None for p in method.student.encoder.parameters())
    bn = [m for m in method.teacher.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bn and all(m.training for m in bn) and int(bn[0].num_batches_tracked) == 2  # one forward per view
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = [p.clone() for p in method.teacher.parameters()]
    buffers = {k: v.clone() for k, v in method.teacher.named_buffers()}
    step = 7
    m = method.momentum(step)
    method.after_step(step)
    for tb, pt, po in zip(before, method.teacher.parameters(), method.student.encoder.parameters()):
        assert torch.allclose(pt, m * tb + (1 - m) * po, atol=1e-6)
    for k, v in method.teacher.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_momentum_schedule_first_middle_last():
    method = tiny_byol("method.byol.momentum=0.99")
    n = 20  # 5 steps x 4 epochs; BYOL: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
    assert method.momentum(0) == pytest.approx(0.99)
    assert method.momentum(10) == pytest.approx(0.995)
    assert method.momentum(19) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 19 / n) + 1) / 2)
    assert 0.9999 < method.momentum(19) < 1


def test_collapse_stats():
    torch.manual_seed(0)
    z = torch.randn(256, 64)
    healthy = representation_stats(z, z, z + 0.1 * torch.randn_like(z))
    assert float(healthy["proj_std"]) == pytest.approx(64 ** -0.5, rel=0.1)
    assert 0.9 < float(healthy["target_cos"]) <= 1
    collapsed = representation_stats(torch.ones(256, 64) + 1e-4 * torch.randn(256, 64), z, -z)
    assert float(collapsed["proj_std"]) < 1e-3
    assert float(collapsed["target_cos"]) == pytest.approx(-1)
    method = tiny_byol()
    method.train()
    _, logs = method.loss(views(), 0)
    assert set(logs) >= {"proj_std", "target_cos", "momentum"}


def test_two_training_steps_through_the_trainer(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "method.name=byol", "crops.n_local=0", "crops.global_scale=[0.08,1.0]",
                      *TINY_PROJ, "data.limit=32", "train.epochs=1", "train.clip_grad=0",
                      "method.byol.momentum=0.99")
    out = train(cfg)
    assert out.images_seen == 32
    rows = [json.loads(line) for line in (Path(out.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(0 <= r["loss"] <= 8 and 0 < r["proj_std"] for r in train_rows)


def test_collapse_warning_on_a_point_representation():
    from bcssl.methods.byol import representation_collapse_warning, representation_stats

    z = torch.randn(64, 32)
    healthy = {k: float(v) for k, v in representation_stats(z, z, z).items()}
    point = {k: float(v) for k, v in representation_stats(torch.ones(64, 32) + 1e-4 * z, z, z).items()}
    assert representation_collapse_warning(healthy, 32) is None
    assert "collapse" in representation_collapse_warning(point, 32)
