"""LARS against moco-v3's update formula; build_optimizer's choices."""
from __future__ import annotations

import copy

import pytest
import torch

from bcssl.engine.optim import LARS, build_optimizer


def lars_reference(w, g, mu, lr, wd, momentum, eta, adapt):
    """One LARS step written from the formula (moco-v3 ``moco/optimizer.py``)."""
    d = g.clone()
    if adapt:
        d = g + wd * w
        q = eta * w.norm() / d.norm()
        d = q * d
    mu = momentum * mu + d
    return w - lr * mu, mu


def test_lars_two_steps_match_formula_and_exclude_1d_params():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    ref_w, ref_b = w.detach().clone(), b.detach().clone()
    sgd_w = ref_w.clone()
    mu_w, mu_b, mu_sgd = torch.zeros_like(ref_w), torch.zeros_like(ref_b), torch.zeros_like(ref_w)
    for _ in range(2):  # the second step checks the momentum buffer
        gw, gb = torch.randn(3, 4), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        ref_w, mu_w = lars_reference(ref_w, gw, mu_w, lr, wd, mom, eta, adapt=True)
        ref_b, mu_b = lars_reference(ref_b, gb, mu_b, lr, wd, mom, eta, adapt=False)  # bias: plain momentum SGD
        sgd_w, mu_sgd = lars_reference(sgd_w, gw, mu_sgd, lr, wd, mom, eta, adapt=False)
        assert torch.allclose(w, ref_w, atol=1e-6)
        assert torch.allclose(b, ref_b, atol=1e-6)
    # the trust ratio matters: the 2-D weight did not get the plain momentum-SGD update
    assert not torch.allclose(w, sgd_w, atol=1e-3)


def test_lars_zero_norm_weight_uses_ratio_one_and_group_exclusion():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.9)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(w, -torch.ones(2, 2))  # ||w|| == 0: q = 1

    v = torch.nn.Parameter(torch.randn(3, 3))
    start = v.detach().clone()
    opt = LARS([{"params": [v], "lars_exclude": True}], lr=0.1, weight_decay=0.5, momentum=0.9)
    g = torch.randn(3, 3)
    v.grad = g.clone()
    opt.step()
    assert torch.allclose(v, start - 0.1 * g, atol=1e-7)  # no weight decay, no adaptation


def test_build_optimizer_choices_and_group_weight_decay():
    a, b = torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2))
    groups = lambda: [{"params": [a]}, {"params": [b], "weight_decay": 0.0}]  # noqa: E731
    adamw = build_optimizer("adamw", groups(), lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    lars = build_optimizer("lars", groups(), lr=0.3, weight_decay=1e-6, momentum=0.8)
    assert isinstance(lars, LARS) and lars.param_groups[0]["momentum"] == 0.8
    assert lars.param_groups[0]["trust_coefficient"] == 0.001
    assert [g["weight_decay"] for g in lars.param_groups] == [1e-6, 0.0]
    sgd = build_optimizer("sgd", groups(), lr=0.1, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="Did you mean 'lars'"):
        build_optimizer("lasr", groups(), lr=0.1, weight_decay=0.0)


def test_lars_state_dict_round_trip():
    w = torch.nn.Parameter(torch.randn(2, 3))
    opt = LARS([w], lr=0.1, weight_decay=0.01)
    w.grad = torch.randn(2, 3)
    opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = LARS([w2], lr=0.1, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file (no shared tensors)
    g = torch.randn(2, 3)
    w.grad, w2.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)
