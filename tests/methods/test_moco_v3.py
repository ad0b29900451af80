"""MoCo v3 against facebookresearch/moco-v3 (docs/recipe.md section 4)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcssl.config import load_config
from bcssl.engine import distributed
from bcssl.engine.optim import build_optimizer
from bcssl.engine.trainer import train
from bcssl.methods import MoCoV3, create_method
from bcssl.methods.moco_v3 import contrastive_loss, moco_v3_loss
from bcssl.models.vit_mocov3 import sincos_position_embedding
from tests.conftest import TINY_MODEL, tiny_config

TINY_PROJ = ["method.moco_v3.proj_hidden_dim=32", "method.moco_v3.proj_dim=16"]
# A tiny ViT: patch 8 (stem_stride 2), width 64 (1 head), 1 block.
TINY_VIT = ["model.name=vit_s16", "model.kernel_size=null", "model.dims=[64]", "model.depths=[1]"]
TINY_RESNET = ["model.name=resnet50", "model.kernel_size=null", "model.dims=[16,32,64,128]"]
# MoCo v3's own ViT (vits.py: 12 heads of 32 dims at width 384; here width 64, 2 heads), patch 16, 1 block.
TINY_VIT_MOCO = ["model.name=vit_s16_mocov3", "model.kernel_size=null", "model.stem_stride=4", "model.dims=[64]",
                 "model.depths=[1]"]


def tiny_moco(*extra, steps_per_epoch=5, epochs=4):
    cfg = load_config(None, [*TINY_MODEL, *TINY_PROJ, "method.name=moco_v3", *extra])
    method = create_method("moco_v3", cfg.model, cfg.method)
    method.setup(steps_per_epoch, epochs)
    return method


def views(B=4):
    return [torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)]


def direct_ctr(q, k_all, T, offset):
    """CE(q_n k_n^T / T, positives at column offset + i) * 2T, written out with logsumexp."""
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k_all / k_all.norm(dim=1, keepdim=True)
    logits = qn @ kn.t() / T
    n = q.shape[0]
    nll = [torch.logsumexp(logits[i], 0) - logits[i, offset + i] for i in range(n)]
    return torch.stack(nll).mean() * 2 * T


@pytest.mark.parametrize("T", [1.0, 0.2])
def test_contrastive_loss_matches_formula_positives_on_diagonal(T):
    torch.manual_seed(2)
    N, D = 8, 16
    q1, q2, k1, k2 = (torch.randn(N, D) for _ in range(4))
    got = contrastive_loss(q1, k2, T)
    assert torch.allclose(got, direct_ctr(q1, k2, T, 0), atol=1e-5)
    # the 2T factor: the bare cross-entropy is different unless T = 0.5
    assert not torch.allclose(got, F.cross_entropy(F.normalize(q1) @ F.normalize(k2).t() / T, torch.arange(N)))
    # positives on the diagonal: shuffling the keys changes the loss
    perm = torch.roll(torch.arange(N), 1)
    assert not torch.allclose(got, contrastive_loss(q1, k2[perm], T), atol=1e-4)
    sym = moco_v3_loss(q1, q2, k1, k2, T)
    assert torch.allclose(sym, direct_ctr(q1, k2, T, 0) + direct_ctr(q2, k1, T, 0), atol=1e-5)
    # perfect, well separated keys: loss near 0 at a low temperature
    eye = torch.eye(N, D)
    assert contrastive_loss(eye, eye, 0.05) < 1e-3


def test_keys_gathered_with_rank_offset_and_no_grad(monkeypatch):
    """Fake "rank 1 of 2": the gathered keys are [rank 0's, ours]; our positives sit at N + i."""
    torch.manual_seed(4)
    N, D, T = 4, 8, 0.2
    q, k, other = torch.randn(N, D, requires_grad=True), torch.randn(N, D, requires_grad=True), torch.randn(N, D)
    gathered = []

    def fake_gather(t):
        assert not t.requires_grad  # keys are detached before the gather
        out = torch.cat([F.normalize(other, dim=1), t])
        gathered.append(out)
        return out

    monkeypatch.setattr(distributed, "all_gather_cat", fake_gather)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    got = contrastive_loss(q, k, T)
    assert gathered and gathered[0].shape == (2 * N, D)
    k_all = torch.cat([other, k.detach()])
    assert torch.allclose(got, direct_ctr(q.detach(), k_all, T, N), atol=1e-5)
    assert not torch.allclose(got, direct_ctr(q.detach(), k_all, T, 0), atol=1e-4)
    got.backward()
    assert q.grad is not None and k.grad is None  # no gradient through the keys


def test_single_process_gather_is_identity():
    t = torch.randn(3, 5)
    assert distributed.all_gather_cat(t) is t and distributed.rank() == 0


def _linears_and_bns(mlp):
    return [m for m in mlp if isinstance(m, nn.Linear)], [m for m in mlp if isinstance(m, nn.BatchNorm1d)]


def test_heads_structure_cnn():
    method = tiny_moco()
    proj, pred = method.student.encoder.projector, method.student.predictor
    nf = method.student.encoder.backbone.num_features
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no last BN (CNN)
    lin, bns = _linears_and_bns(proj)
    assert [(m.in_features, m.out_features) for m in lin] == [(nf, 32), (32, 16)]
    assert bns[0].affine and not bns[-1].affine and bns[-1].weight is None  # last BN affine=False
    lin_p, _ = _linears_and_bns(pred)
    assert [(m.in_features, m.out_features) for m in lin_p] == [(16, 32), (32, 16)]
    assert all(m.bias is None for m in lin + lin_p)  # no bias in MoCo v3's linears
    assert method.eval_backbone() is method.student.encoder.backbone  # linear eval: base encoder


def test_heads_structure_vit_and_stop_grad_conv1_error():
    method = tiny_moco(*TINY_VIT)
    proj, pred = method.student.encoder.projector, method.student.predictor
    lin, bns = _linears_and_bns(proj)
    assert len(lin) == 3 and not bns[-1].affine and isinstance(proj[-1], nn.BatchNorm1d)  # 3 layers for ViT
    assert isinstance(pred[-1], nn.BatchNorm1d) and not pred[-1].affine  # MoCo_ViT: predictor last_bn=True
    assert all(m.bias is None for m in lin)
    two = tiny_moco(*TINY_VIT, "method.moco_v3.proj_layers=2")
    assert len(_linears_and_bns(two.student.encoder.projector)[0]) == 2
    with pytest.raises(ValueError, match="stop_grad_conv1"):
        tiny_moco("method.moco_v3.stop_grad_conv1=true")  # bcssl_atto has no patch embedding


def test_momentum_encoder_no_grad_ema_of_parameters_only_and_schedule():
    method = tiny_moco("method.moco_v3.momentum=0.99")
    assert isinstance(method, MoCoV3)
    method.train()
    for (n, pb), pm in zip(method.student.encoder.named_parameters(), method.teacher.parameters()):
        assert torch.equal(pb, pm), n
    loss, logs = method.loss(views(), step=0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters())
    bn = [m for m in method.teacher.modules() if isinstance(m, nn.BatchNorm1d)]
    assert bn and all(m.training for m in bn) and int(bn[0].num_batches_tracked) == 2  # one forward per view
    assert set(logs) >= {"proj_std", "target_cos", "momentum"}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = [p.clone() for p in method.teacher.parameters()]
    buffers = {k: v.clone() for k, v in method.teacher.named_buffers()}
    m = method.momentum(7)
    method.after_step(7)
    for tb, pm, pb in zip(before, method.teacher.parameters(), method.student.encoder.parameters()):
        assert torch.allclose(pm, m * tb + (1 - m) * pb, atol=1e-6)
    for k, v in method.teacher.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # moco-v3: m = 1 - 0.5 (1 + cos(pi t / T)) (1 - m0), t/T the fraction of training done
    n = 20
    want = lambda t: 1 - 0.5 * (1 + math.cos(math.pi * t / n)) * (1 - 0.99)  # noqa: E731
    for t, value in ((0, 0.99), (10, 0.995), (19, want(19))):
        assert method.momentum(t) == pytest.approx(value, abs=1e-12)


def test_random_patch_projection_frozen_through_an_optimizer_step():
    method = tiny_moco(*TINY_VIT, "method.moco_v3.stop_grad_conv1=true")
    method.train()
    proj = method.student.encoder.backbone.model.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    assert torch.equal(method.teacher.backbone.model.patch_embed.proj.weight, proj.weight)
    frozen = {id(proj.weight), id(proj.bias)}
    before = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    opt = build_optimizer("adamw", method.param_groups(), lr=1e-2, weight_decay=0.1)
    assert not any(id(p) in frozen for g in opt.param_groups for p in g["params"])
    method.loss(views(), 0)[0].backward()
    opt.step()
    for n, p in method.student.named_parameters():
        if "patch_embed.proj" in n:
            assert torch.equal(p, before[n]), n
        elif p.requires_grad:
            assert not torch.equal(p, before[n]), n
    # without the flag the patch embedding is trained
    plain = tiny_moco(*TINY_VIT)
    plain.train()
    w = plain.student.encoder.backbone.model.patch_embed.proj.weight
    assert w.requires_grad
    w0 = w.detach().clone()
    opt = build_optimizer("adamw", plain.param_groups(), lr=1e-2, weight_decay=0.1)
    plain.loss(views(), 0)[0].backward()
    opt.step()
    assert not torch.equal(w, w0)


def test_mocov3_vit_s_step_keeps_sincos_table_and_patch_projection_and_trains_the_rest():
    """MoCo v3's own ViT-S/16 (vits.py) with --stop-grad-conv1, one AdamW step as main_moco.py takes it
    (weight decay on every parameter): the fixed sin-cos position embedding and the random patch
    projection stay as they were, every other student weight moves."""
    method = tiny_moco(*TINY_VIT_MOCO, "method.moco_v3.stop_grad_conv1=true")
    method.train()
    vit = method.student.encoder.backbone.model
    table = sincos_position_embedding(14, 14, 64)  # img_size 224 / patch 16; 32 px crops resample it
    assert torch.equal(vit.pos_embed, table)
    decayed, not_decayed = method.param_groups()
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in trainable} and not not_decayed["params"]
    assert any(p.ndim == 1 for p in decayed["params"])  # biases and norms decayed too (AdamW(model.parameters()))
    before = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    opt = build_optimizer("adamw", method.param_groups(), lr=1e-3, weight_decay=0.1)
    method.loss(views(), 0)[0].backward()
    opt.step()
    method.after_step(0)
    fixed = ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    for n, p in method.student.named_parameters():
        if n.endswith(fixed):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n
    assert torch.equal(vit.pos_embed, table)
    teacher = method.teacher.backbone.model  # EMA of equal tensors: equal up to float rounding (as moco-v3's)
    assert torch.allclose(teacher.pos_embed, table, atol=1e-6)
    assert torch.allclose(teacher.patch_embed.proj.weight, vit.patch_embed.proj.weight, atol=1e-6)
    # full size: MoCo v3's ViT-S/16 with --stop-grad-conv1 trains 21,294,720 backbone parameters
    cfg = load_config(None, ["model.name=vit_s16_mocov3", "model.kernel_size=null", "method.name=moco_v3",
                             "method.moco_v3.stop_grad_conv1=true"])
    with torch.device("meta"):
        full = create_method("moco_v3", cfg.model, cfg.method)
    assert sum(p.numel() for p in full.student.encoder.backbone.parameters() if p.requires_grad) == 21_294_720


@pytest.mark.parametrize("model", [[], TINY_RESNET, [*TINY_VIT, "method.moco_v3.stop_grad_conv1=true",
                                                     "method.moco_v3.temperature=0.2"]],
                         ids=["bcssl", "resnet50", "vit_s16_stop_grad_conv1"])
def test_two_training_steps_through_the_trainer(tmp_path, tiny_fmnist, model):
    cfg = tiny_config(tmp_path, tiny_fmnist, "method.name=moco_v3", "crops.n_local=0",
                      "crops.global_scale=[0.08,1.0]", *TINY_PROJ, "data.limit=32", "train.epochs=1",
                      "train.clip_grad=0", "method.moco_v3.momentum=0.99", *model)
    out = train(cfg)
    assert out.images_seen == 32
    rows = [json.loads(line) for line in (Path(out.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["proj_std"] > 0 for r in train_rows)
