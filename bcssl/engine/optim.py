"""Optimisers: ``build_optimizer(name, param_groups, ...)`` for ``train.optimizer`` in
{adamw, lars, sgd}, and LARS as facebookresearch/moco-v3 writes it (``moco/optimizer.py``).

LARS (You et al., 2017), moco-v3 version, per parameter ``w`` with gradient ``g``:

    if w.ndim > 1 (not a bias or a norm's gamma/beta):      # and the group has no lars_exclude
        d = g + weight_decay * w
        q = eta * ||w|| / ||d||   (1 where ||w|| == 0 or ||d|| == 0)
        d = q * d
    else:
        d = g                     # no weight decay, no trust ratio
    mu = momentum * mu + d        # (mu starts at 0)
    w  = w - lr * mu

with ``eta`` (``trust_coefficient``) 0.001 and momentum 0.9. moco-v3 passes all parameters in
one group and excludes by ``ndim``; BYOL's optax LARS excludes biases and norms by name, which
for these models selects the same tensors. A group may also set ``lars_exclude=True`` to take
*all* its parameters out of the adaptation and the weight decay (Barlow Twins style groups).
"""
from __future__ import annotations

import difflib
from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "lars", "sgd")


class LARS(torch.optim.Optimizer):
    """LARS without rate scaling or weight decay for parameters with ``ndim <= 1`` (moco-v3)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, lars_exclude: bool = False):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum} "
                             f"or trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1 and not g["lars_exclude"]:  # not a bias / norm gamma or beta
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0.0,
                                                g["trust_coefficient"] * param_norm / update_norm, one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(name: str, param_groups: Iterable, lr: float, weight_decay: float,
                    momentum: float = 0.9, fused: bool = False) -> torch.optim.Optimizer:
    """``name`` in {adamw, lars, sgd}. ``param_groups``: parameters or groups (a group's own
    ``weight_decay`` wins, e.g. the trainer's no-decay group). ``fused`` (CUDA) applies to AdamW
    and SGD; LARS is a plain per-parameter loop."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "lars":
        return LARS(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               fused=fused or None)
    close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown optimizer '{name}'.{hint} Available: {', '.join(OPTIMIZERS)}")
