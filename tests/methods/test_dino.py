"""DINO against the formulas of docs/recipe.md section 2 / facebookresearch/dino."""
from __future__ import annotations

import math

import pytest
import torch

from bcssl.config import load_config
from bcssl.methods import DINO, DINOLoss, create_method
from bcssl.models.heads import DINOHead
from tests.conftest import TINY_HEAD, TINY_MODEL


def direct_dino_loss(s, t, center, n_crops, tau_s, tau_t, skip_same=True):
    """The loss written straight from the paper: mean over pairs (i global, j any, j != i)."""
    B = t.shape[0] // 2
    total, n = 0.0, 0
    for i in range(2):
        q = torch.softmax((t[i * B:(i + 1) * B] - center) / tau_t, dim=-1)
        for j in range(n_crops):
            if skip_same and i == j:
                continue
            logp = torch.log_softmax(s[j * B:(j + 1) * B] / tau_s, dim=-1)
            total = total + (-(q * logp).sum(-1)).mean()
            n += 1
    return total / n


def test_loss_matches_formula_and_skips_same_view():
    torch.manual_seed(1)
    B, K, n_crops = 4, 32, 6
    s, t = torch.randn(n_crops * B, K), torch.randn(2 * B, K)
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K) * 0.1)
    center = loss_fn.center.clone()
    got = loss_fn(s, t, n_crops, teacher_temp=0.04)
    want = direct_dino_loss(s, t, center, n_crops, 0.1, 0.04)
    assert torch.allclose(got, want, atol=1e-5)
    with_same = direct_dino_loss(s, t, center, n_crops, 0.1, 0.04, skip_same=False)
    assert not torch.allclose(got, with_same, atol=1e-3)


def test_center_is_ema_of_teacher_batch_mean_updated_after_loss():
    K = 16
    loss_fn = DINOLoss(K, center_momentum=0.9)
    old = torch.randn(1, K)
    loss_fn.center.copy_(old)
    t = torch.randn(8, K)
    s = torch.randn(8, K)
    loss = loss_fn(s, t, 2, 0.04)
    # the loss used the *old* centre
    assert torch.allclose(loss, direct_dino_loss(s, t, old, 2, 0.1, 0.04), atol=1e-5)
    assert torch.allclose(loss_fn.center, 0.9 * old + 0.1 * t.mean(0, keepdim=True), atol=1e-6)


def test_head_shape_and_last_layer_norm():
    head = DINOHead(24, out_dim=50, hidden_dim=40, bottleneck_dim=10, nlayers=3, norm_last_layer=False)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 40), (40, 40), (40, 10)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (50, 1) and torch.all(g == 1) and g.requires_grad
    assert head.last_layer.bias is None
    assert head(torch.randn(3, 24)).shape == (3, 50)
    frozen = DINOHead(24, out_dim=50, hidden_dim=40, bottleneck_dim=10, norm_last_layer=True)
    assert not frozen.last_layer.parametrizations.weight.original0.requires_grad
    # the last layer acts on L2-normalised bottleneck features: weight rows have norm g
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)


def tiny_dino(*extra):
    cfg = load_config(None, [*TINY_MODEL, *TINY_HEAD, *extra])
    method = create_method("dino", cfg.model, cfg.method)
    method.setup(steps_per_epoch=5, epochs=4)
    return method


def crops(B=4, n_local=2):
    return [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(n_local)]


def test_teacher_no_grad_ema_of_parameters_only_and_train_mode():
    method = tiny_dino()
    assert isinstance(method, DINO)
    method.train()
    # teacher starts as a copy of the student, without stochastic depth
    for (n, ps), pt in zip(method.student.named_parameters(), method.teacher.parameters()):
        assert torch.equal(ps, pt), n
    assert all(not p.requires_grad for p in method.teacher.parameters())
    loss, logs = method.loss(crops(), step=0)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None for p in method.student.parameters())
    # the teacher forward in train mode updated its BN statistics (batch stats, not running)
    bn = [m for m in method.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.training for m in bn) and int(bn[0].num_batches_tracked) == 1
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    t_before = [p.clone() for p in method.teacher.parameters()]
    buffers_before = {k: v.clone() for k, v in method.teacher.named_buffers()}
    step = 7
    m = method.momentum(step)
    method.after_step(step)
    for tb, pt, ps in zip(t_before, method.teacher.parameters(), method.student.parameters()):
        assert torch.allclose(pt, m * tb + (1 - m) * ps, atol=1e-6)
    for k, v in method.teacher.named_buffers():  # buffers are not averaged
        assert torch.equal(v, buffers_before[k]), k
    assert method.eval_backbone() is method.teacher.backbone


def test_last_layer_frozen_during_first_epoch_only():
    method = tiny_dino("method.dino.freeze_last_layer=1")
    for step, frozen in ((0, True), (4, True), (5, False), (19, False)):
        method.zero_grad(set_to_none=True)
        method.loss(crops(), step)[0].backward()
        method.before_optimizer_step(step)
        last = list(method.student.head.last_layer.parameters())
        assert all((p.grad is None) == frozen for p in last if p.requires_grad), step
        assert method.student.head.mlp[0].weight.grad is not None


def test_teacher_temperature_and_momentum_schedules():
    method = tiny_dino("method.dino.warmup_teacher_temp=0.04", "method.dino.teacher_temp=0.07",
                       "method.dino.warmup_teacher_temp_epochs=3", "method.dino.momentum_teacher=0.996")
    # steps_per_epoch=5, epochs=4: epochs 0,1,2 warm up linearly (np.linspace(0.04, 0.07, 3))
    assert method.teacher_temp(0) == pytest.approx(0.04)
    assert method.teacher_temp(5) == pytest.approx(0.055)
    assert method.teacher_temp(14) == pytest.approx(0.07)
    assert method.teacher_temp(19) == pytest.approx(0.07)
    n = 20  # momentum: cosine 0.996 -> 1 over all steps, DINO's cosine_scheduler
    want = lambda i: 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * i / n))  # noqa: E731
    for i in (0, 10, 19):
        assert method.momentum(i) == pytest.approx(want(i), abs=1e-12)
    assert method.momentum(0) == pytest.approx(0.996)


def test_loss_near_log_k_at_uniform_and_logs_collapse_stats():
    method = tiny_dino()
    method.train()
    loss, logs = method.loss(crops(), 0)
    assert torch.isfinite(loss)
    assert 0 <= float(logs["teacher_entropy"]) <= 1 and 0 <= float(logs["teacher_batch_entropy"]) <= 1
    assert logs["teacher_temp"] == pytest.approx(0.04)


def test_collapse_warnings():
    method = tiny_dino()
    assert method.collapse_warning({"teacher_entropy": 0.6, "teacher_batch_entropy": 0.8}) is None
    assert "uniform" in method.collapse_warning({"teacher_entropy": 0.99, "teacher_batch_entropy": 0.99})
    assert "same prototype" in method.collapse_warning({"teacher_entropy": 0.01, "teacher_batch_entropy": 0.01})


def dinov2_sinkhorn_knopp(t, temp, n_iterations=3):
    """DINOv2's sinkhorn_knopp_teacher as published (one process), for comparison."""
    q = torch.exp(t / temp).t()
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_sinkhorn_knopp_matches_dinov2_and_survives_sharp_temperatures():
    from bcssl.methods.dino import sinkhorn_knopp

    torch.manual_seed(0)
    t = torch.randn(16, 32) * 0.5
    p = sinkhorn_knopp(t, 0.1)
    assert torch.allclose(p, dinov2_sinkhorn_knopp(t, 0.1), atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(16), atol=1e-5)  # one unit of assignment per sample
    sharp = torch.randn(16, 32) * 5  # exp(logit / 0.04) overflows float32 in the published form
    assert not torch.isfinite(dinov2_sinkhorn_knopp(sharp, 0.04)).all()
    q = sinkhorn_knopp(sharp, 0.04)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(16), atol=1e-4)
    # 3 iterations already balance the batch over the prototypes far better than a plain softmax
    plain = torch.softmax(sharp / 0.04, dim=-1).sum(0)
    assert q.sum(0).std() < 0.5 * plain.std()


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    from bcssl.methods.dino import koleo_loss

    torch.manual_seed(0)
    x = torch.randn(10, 6)
    xn = torch.nn.functional.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.diag(torch.full((10,), float("inf")))
    assert koleo_loss(x).item() == pytest.approx(-torch.log(d.min(dim=1).values + 1e-8).mean().item(), abs=1e-5)
    spread = torch.eye(6)  # orthogonal vectors are as far apart as they can be: lower loss
    assert koleo_loss(spread) < koleo_loss(spread + 0.5)


def test_sinkhorn_centring_and_koleo_in_the_dino_step():
    from bcssl.methods.dino import koleo_loss, sinkhorn_knopp

    method = tiny_dino("method.dino.centering=sinkhorn_knopp", "method.dino.koleo_weight=0.1")
    method.train()
    c = crops()
    torch.manual_seed(3)
    loss, logs = method.loss(c, 0)
    assert method.dino_loss.center.abs().sum() == 0  # Sinkhorn-Knopp replaces the centre
    # the same step written out: teacher targets by Sinkhorn-Knopp per global view, plus 0.1 x KoLeo
    # of the student's backbone features of each global view
    torch.manual_seed(3)
    with torch.no_grad():
        t = method.teacher(c[:2])
    s, feats = method.student(c, return_features=True)
    B = c[0].shape[0]
    q = torch.cat([sinkhorn_knopp(x, 0.04) for x in t.chunk(2)])
    want = 0.0
    n = 0
    for i in range(2):
        for j in range(len(c)):
            if i != j:
                want = want + (-(q[i * B:(i + 1) * B] * torch.log_softmax(s[j * B:(j + 1) * B] / 0.1, -1)).sum(-1)).mean()
                n += 1
    want = want / n + 0.1 * (koleo_loss(feats[:B]) + koleo_loss(feats[B:2 * B]))
    assert torch.allclose(loss, want, atol=1e-4) and "koleo" in logs
    loss.backward()
    assert method.student.backbone.stem[0].weight.grad is not None
