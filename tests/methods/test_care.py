"""CARE: loss against its formula, T-stream on stage 3, the T -> C supervision's gradient path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bcssl.config import load_config
from bcssl.engine.trainer import train
from bcssl.methods import CARE, create_method
from bcssl.methods.care import MHSA2d, care_loss, stage3_and_pooled
from tests.conftest import TINY_MODEL, tiny_config

SMALL_HEAD = ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.care_blocks=2", "method.care_pos_size=4"]


def tiny_care(*extra):
    cfg = load_config(None, [*TINY_MODEL, "method.name=care", *SMALL_HEAD, *extra])
    method = create_method("care", cfg.model, cfg.method)
    method.setup(steps_per_epoch=4, epochs=2)
    return method.train()


def byol_term(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def test_loss_matches_formula():
    torch.manual_seed(0)
    p1c, p2c, z1c, z2c, p1t, p2t, z1t, z2t = (torch.randn(6, 8) for _ in range(8))
    got, parts = care_loss((p1c, p2c, z1c, z2c), (p1t, p2t, z1t, z2t), lam=100.0)
    byol_c = (byol_term(p1c, z2c) + byol_term(p2c, z1c)).mean()
    byol_t = (byol_term(p1t, z2t) + byol_term(p2t, z1t)).mean()
    # official CARE: nn.MSELoss (mean over batch and dims) per view, the two views summed
    attn = sum(((F.normalize(pc, dim=-1) - F.normalize(pt, dim=-1)) ** 2).mean() for pc, pt in ((p1c, p1t), (p2c, p2t)))
    assert torch.allclose(got, byol_c + byol_t + 100 * attn, atol=1e-5)
    assert torch.allclose(parts["loss_attn"], attn, atol=1e-6)


def test_t_to_c_supervision_does_not_train_the_t_stream_predictions():
    p_c = torch.randn(4, 8, requires_grad=True)
    p_t = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8)
    # only the attention term depends on both; with the BYOL terms' targets fixed, compare grads
    loss, _ = care_loss((p_c, p_c, z, z), (p_t, p_t, z, z), lam=100.0)
    loss.backward()
    only_byol_t = torch.autograd.grad(care_loss((p_c.detach(), p_c.detach(), z, z), (p_t, p_t, z, z), 0.0)[0], p_t)[0]
    assert torch.allclose(p_t.grad, only_byol_t, atol=1e-6)  # the lambda term sends nothing to the T-stream


def test_stage3_map_and_pooled_match_the_backbone():
    method = tiny_care()
    bb = method.student.encoder.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    s3, pooled = stage3_and_pooled(bb, x)
    assert s3.shape == (2, 32, 4, 4)  # dims[2] = 32; 32 px / stem 2 / 2 / 2
    assert torch.allclose(pooled, bb(x), atol=1e-6)


def test_mhsa_uses_position_and_any_map_size():
    attn = MHSA2d(8, heads=4, pos_size=4)
    x = torch.randn(2, 8, 3, 5)
    assert attn(x).shape == x.shape
    y0 = attn(x)
    with torch.no_grad():
        attn.rel_h[:, :, 0].add_(1.0)  # a constant shift would cancel in the softmax; one row's does not
    assert not torch.allclose(attn(x), y0)


def test_teacher_is_ema_without_grads_and_eval_backbone_is_online():
    method = tiny_care()
    assert isinstance(method, CARE)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    loss, logs = method.loss(crops, 0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    t_stream_grads = [p.grad for p in method.student.encoder.t_stream.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in t_stream_grads)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01)
    before = [p.clone() for p in method.teacher.parameters()]
    m = method.momentum(3)
    method.after_step(3)
    for b, t, s in zip(before, method.teacher.parameters(), method.student.encoder.parameters()):
        assert torch.allclose(t, m * b + (1 - m) * s, atol=1e-6)
    assert method.eval_backbone() is method.student.encoder.backbone
    assert {"loss_c", "loss_t", "loss_attn", "proj_std"} <= logs.keys()


def test_rejects_backbones_without_a_stage3_map():
    cfg = load_config(None, ["model.name=vit_s16", "method.name=care", *SMALL_HEAD])
    with pytest.raises(ValueError, match="stage-3"):
        create_method("care", cfg.model, cfg.method)


@pytest.mark.parametrize("model", [[], ["model.name=resnet50", "model.dims=[16,32,64,128]", "model.depths=[1,1,1,1]",
                                        "model.stem_stride=2", "model.kernel_size=null", "model.dw_norm=null"]])
def test_two_training_steps(tmp_path, tiny_fmnist, model):
    cfg = tiny_config(tmp_path, tiny_fmnist, "method.name=care", *SMALL_HEAD, "crops.n_local=0",
                      "train.epochs=1", "data.limit=32", *model)
    res = train(cfg)
    assert res.images_seen == 32 and res.nonfinite_steps == 0
