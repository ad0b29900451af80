"""CARE against ChongjianGE/CARE: the T-stream's shapes and parameter count, the loss, the init,
the optimiser's parameter groups, the stage map through the backbone contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcssl.config import load_config
from bcssl.engine.trainer import train
from bcssl.methods import CARE, create_method
from bcssl.methods.care import Attention, CAREMLP, TransStack, care_loss
from tests.conftest import TINY_MODEL, tiny_config

SMALL_HEAD = ["method.care.proj_hidden_dim=32", "method.care.proj_dim=16", "method.care.blocks=2",
              "method.care.fmap_size=4", "method.care.dim_head=8"]

# ChongjianGE/CARE models/resnet_care.py: TransStack(dim=1024, fmap_size=14, dim_out=2048, proj_factor=4,
# downsample=True, heads=4, num_layers=5, dim_head=128, rel_pos_emb=False). Its parameter count, from
# the shapes in models/trans.py (and checked by building trans.py itself):
#   block 1 (1024 -> 2048, downsampling, 14x14 attention):
#     shortcut conv3x3 1024*2048*9 + BN 2*2048; conv1x1 1024*512 + BN 2*512; to_qkv 512*(3*4*128);
#     position tables 2 * 14*128; BN 2*512; conv1x1 512*2048; BN 2*2048                = 21,247,488
#   blocks 2-5 (2048 -> 2048, 7x7): conv 2048*512 + BN 2*512 + to_qkv 512*1536 + 2 * 7*128
#     + BN 2*512 + conv 512*2048 + BN 2*2048                                         = 2,891,520 each
OFFICIAL_TRANS_STACK_PARAMS = 21_247_488 + 4 * 2_891_520  # = 32,813,568


def tiny_care(*extra):
    cfg = load_config(None, [*TINY_MODEL, "method.name=care", *SMALL_HEAD, *extra])
    method = create_method("care", cfg.model, cfg.method)
    method.setup(steps_per_epoch=4, epochs=2)
    return method.train()


def byol_term(p, z):
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


def test_transformer_stream_has_the_official_shape_and_parameter_count():
    block1 = (1024 * 2048 * 9 + 2 * 2048) + (1024 * 512 + 2 * 512) + 512 * 3 * 4 * 128 + 2 * 14 * 128 \
        + 2 * 512 + 512 * 2048 + 2 * 2048
    block = 2048 * 512 + 2 * 512 + 512 * 1536 + 2 * 7 * 128 + 2 * 512 + 512 * 2048 + 2 * 2048
    assert (block1, block) == (21_247_488, 2_891_520)
    with torch.device("meta"):
        stack = TransStack(1024, 14, 2048, proj_factor=4, downsample=True, heads=4, blocks=5, dim_head=128)
    assert sum(p.numel() for p in stack.parameters()) == OFFICIAL_TRANS_STACK_PARAMS == 32_813_568
    first, second = stack.net[0], stack.net[1]
    assert [tuple(p.shape) for p in first.net[3].pos_emb.parameters()] == [(14, 128), (14, 128)]
    assert [tuple(p.shape) for p in second.net[3].pos_emb.parameters()] == [(7, 128), (7, 128)]
    assert first.shortcut[0].kernel_size == (3, 3) and first.shortcut[0].stride == (2, 2)
    assert isinstance(second.shortcut, nn.Identity)
    assert first.net[3].to_qkv.out_channels == 3 * 4 * 128 and first.net[3].to_qkv.in_channels == 512


def test_transformer_stream_maps_and_init():
    torch.manual_seed(0)
    stack = TransStack(32, 4, 64, proj_factor=4, downsample=True, heads=4, blocks=3, dim_head=8)
    x = torch.randn(2, 32, 4, 4)
    assert stack(x).shape == (2, 64, 2, 2)  # 1024 -> 2048 and 14 -> 7, at a small scale
    bns = [m for m in stack.modules() if isinstance(m, nn.BatchNorm2d)]
    # resnet_care.py's init loop sets every BN weight to 1, overwriting trans.py's zero-init of the last
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)
    conv = stack.net[1].net[0]  # kaiming-normal fan-out: std sqrt(2 / (out * k * k))
    assert conv.weight.std().item() == pytest.approx((2 / conv.out_channels) ** 0.5, rel=0.15)
    with pytest.raises(ValueError, match="method.care.fmap_size"):
        stack(torch.randn(2, 32, 6, 6))  # the position tables are for 4x4 maps


def test_attention_uses_height_plus_width_position_tables():
    torch.manual_seed(0)
    attn = Attention(8, fmap_size=3, heads=2, dim_head=4)
    x = torch.randn(2, 8, 3, 3)
    y0 = attn(x)
    assert y0.shape == (2, 8, 3, 3)
    q, k, v = attn.to_qkv(x).chunk(3, dim=1)
    q, k, v = (t.reshape(2, 2, 4, 9).transpose(-2, -1) for t in (q, k, v))
    q = q / 2  # dim_head ** -0.5
    emb = torch.stack([attn.pos_emb.height[i] + attn.pos_emb.width[j] for i in range(3) for j in range(3)])
    want = ((q @ k.transpose(-2, -1) + q @ emb.t()).softmax(-1) @ v).transpose(-2, -1).reshape(2, 8, 3, 3)
    assert torch.allclose(y0, want, atol=1e-5)
    with torch.no_grad():
        attn.pos_emb.width[1].add_(1.0)
    assert not torch.allclose(attn(x), y0)


def test_care_mlps_have_biases_everywhere():
    mlp = CAREMLP(8, 16, 4)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(m.bias is not None for m in linears)  # BYOL's last Linear has none


def test_loss_matches_the_official_formula():
    torch.manual_seed(0)
    p1c, p2c, z1c, z2c, p1t, p2t, z1t, z2t = (torch.randn(6, 8) for _ in range(8))
    got, parts = care_loss((p1c, p2c, z1c, z2c), (p1t, p2t, z1t, z2t), lam=100.0)
    n = lambda t: F.normalize(t, dim=-1)  # noqa: E731
    byol_c = (byol_term(p1c, z2c) + byol_term(p2c, z1c)).mean()
    byol_t = (byol_term(p1t, z2t) + byol_term(p2t, z1t)).mean()
    # care_module.py: nn.MSELoss (mean over batch and dims) for the online predictions and the momentum
    # projections of both views, the T side detached
    fea = sum(((n(a) - n(b)) ** 2).mean() for a, b in ((p1c, p1t), (p2c, p2t), (z1c, z1t), (z2c, z2t)))
    assert torch.allclose(got, byol_c + byol_t + 100 * fea, atol=1e-5)
    assert torch.allclose(parts["loss_attn"], fea, atol=1e-6)


def test_t_to_c_supervision_does_not_train_the_t_stream_predictions():
    p_c = torch.randn(4, 8, requires_grad=True)
    p_t = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8)
    loss, _ = care_loss((p_c, p_c, z, z), (p_t, p_t, z, z), lam=100.0)
    loss.backward()
    only_byol_t = torch.autograd.grad(care_loss((p_c.detach(), p_c.detach(), z, z), (p_t, p_t, z, z), 0.0)[0], p_t)[0]
    assert torch.allclose(p_t.grad, only_byol_t, atol=1e-6)  # the lambda term sends nothing to the T-stream


def test_t_stream_reads_the_stage_map_before_the_last_through_the_contract():
    method = tiny_care()
    enc = method.student.encoder
    seen = []
    enc.t_stream.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    x = torch.randn(2, 3, 32, 32)
    z_c, z_t = enc(x)
    assert seen == [(2, 32, 4, 4)]  # dims[2] = 32 at stride 8 (stem 2): the stage-3 map
    assert z_c.shape == z_t.shape == (2, 16)
    assert enc.t_stream.net[0].shortcut[0].out_channels == 64  # dim_out = the last stage's width


def test_optimiser_decays_every_student_parameter():
    method = tiny_care()
    decayed, not_decayed = method.param_groups()
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in trainable}
    assert any(p.ndim == 1 for p in decayed["params"]) and not not_decayed["params"]


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


def test_rejects_backbones_with_one_stage_map():
    cfg = load_config(None, ["model.name=vit_s16", "model.kernel_size=null", "model.dims=[64]", "model.depths=[1]",
                             "method.name=care", *SMALL_HEAD])
    with pytest.raises(ValueError, match="stage-3"):
        create_method("care", cfg.model, cfg.method)


@pytest.mark.parametrize("model", [[], ["model.name=resnet50", "model.dims=[16,32,64,128]", "model.depths=[1,1,1,1]",
                                        "model.stem_stride=2", "model.kernel_size=null", "model.dw_norm=null"]])
def test_two_training_steps(tmp_path, tiny_fmnist, model):
    cfg = tiny_config(tmp_path, tiny_fmnist, "method.name=care", *SMALL_HEAD, "crops.n_local=0",
                      "train.epochs=1", "data.limit=32", *model)
    res = train(cfg)
    assert res.images_seen == 32 and res.nonfinite_steps == 0
