"""MoCo v3 (Chen, Xie & He, 2021) as in facebookresearch/moco-v3 (``moco/builder.py``, ``main_moco.py``).

Every detail is in this file (settings: ``method.moco_v3.*``):

- base encoder = backbone + projector; momentum encoder = EMA copy of it (parameters only, no
  gradients, train mode); predictor on the base side only.
- heads: ``build_mlp(num_layers, in, 4096, 256, last_bn)`` = [Linear(no bias) -> BN -> ReLU] x
  (num_layers - 1) -> Linear(no bias) (-> BN(affine=False) if last_bn). Projector: last_bn=True,
  2 layers for CNNs (``MoCo_ResNet``), 3 for transformers (``MoCo_ViT``); ``proj_layers``
  overrides. Predictor: 2 layers 256 -> 4096 -> 256, last_bn=False for CNNs and True for
  transformers (``MoCo_ViT`` calls ``_build_mlp(2, dim, mlp_dim, dim)`` with the default
  last_bn=True). A transformer is a backbone with a patch projection (the contract's
  ``patch_projection``). Widths: ``proj_hidden_dim`` (--moco-mlp-dim) / ``proj_dim`` (--moco-dim).
- loss ``ctr(q1, k2) + ctr(q2, k1)`` with
  ``ctr(q, k) = CE(normalize(q) @ all_gather(normalize(k))^T / T, arange(N) + N * rank) * 2T``:
  the keys of every process are the negatives (all-gather, no gradient); the positive of query i
  of rank r is key ``N r + i``. T = ``temperature`` (--moco-t: 1.0 ResNet, 0.2 ViT).
- momentum m: ``1 - 0.5 (1 + cos(pi t / T)) (1 - m0)`` per step (``--moco-m-cos``), m0 =
  ``momentum`` (--moco-m, 0.99). moco-v3 applies the update at the start of step t (before
  computing the keys) with m_t; here ``after_step(t)`` applies m_t right after the optimiser
  step t, i.e. the same update one schedule step earlier.
- each view goes through the encoders on its own (BN batch statistics per view), as in
  ``MoCo.forward``.
- random patch projection (``stop_grad_conv1``, moco-v3's ``--stop-grad-conv1``): the backbone's
  patch projection (the contract's ``patch_projection``) keeps its random init, weight and bias
  frozen; the momentum encoder copies it, so it stays equal. MoCo v3's own ViT-S/16 (12 heads,
  fixed sin-cos position embedding, its init) is the backbone ``vit_s16_mocov3``.
- optimiser: main_moco.py passes ``model.parameters()`` to AdamW / LARS, so weight decay applies
  to every trained parameter, biases and norms included (LARS itself skips 1-D ones):
  :meth:`MoCoV3.param_groups`.
- evaluation uses the base encoder's backbone (``main_lincls.py`` loads ``module.base_encoder``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcssl.engine import distributed as ddp
from bcssl.methods.base import backbone_from_config, decay_all_param_groups
from bcssl.methods.byol import (
    Encoder,
    OnlineNetwork,
    OnlineTargetMethod,
    representation_stats,
    target_encoder,
    warn_unused_crops,
)


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3's ``_build_mlp``: Linear(no bias)-BN-ReLU blocks, a last Linear(no bias), and
    (``last_bn``) a BN without affine parameters (SimCLR's design, gamma removed)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """``ctr(q, k) = CE(q_n k_n^T / T, arange(N) + N rank) * 2T`` over all processes' keys."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    k = ddp.all_gather_cat(k)
    logits = q @ k.t() / temperature
    n = logits.shape[0]  # batch size of this process
    labels = torch.arange(n, dtype=torch.long, device=q.device) + n * ddp.rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Symmetrised: ``ctr(q1, k2) + ctr(q2, k1)``."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


class MoCoV3(OnlineTargetMethod):
    """Base encoder + predictor (``student``) against the momentum encoder's keys (``teacher``)."""

    def __init__(self, model_cfg, method_cfg):
        super().__init__()
        m = method_cfg.moco_v3  # method.moco_v3.*
        self.cfg = m
        self.base_momentum = float(m.momentum)
        self.temperature = float(m.temperature)
        backbone = backbone_from_config(model_cfg)
        patch_projection = backbone.patch_projection
        if m.stop_grad_conv1:
            if patch_projection is None:
                raise ValueError(f"method.moco_v3.stop_grad_conv1=true freezes a transformer's patch projection; "
                                 f"model.name={model_cfg.name} has none")
            patch_projection.requires_grad_(False)  # vits.py: stop_grad_conv1 (weight and bias)
        transformer = patch_projection is not None  # MoCo_ViT's heads; MoCo_ResNet's otherwise
        proj_layers = m.proj_layers or (3 if transformer else 2)
        projector = build_mlp(proj_layers, backbone.num_features, m.proj_hidden_dim, m.proj_dim, last_bn=True)
        predictor = build_mlp(2, m.proj_dim, m.proj_hidden_dim, m.proj_dim, last_bn=transformer)
        encoder = Encoder(backbone, projector)
        self.student = OnlineNetwork(encoder, predictor)
        self.teacher = target_encoder(model_cfg, encoder)  # the momentum encoder

    def param_groups(self) -> list[dict]:
        """main_moco.py: ``AdamW(model.parameters(), lr, weight_decay=wd)`` -- every parameter decayed."""
        return decay_all_param_groups(self.student)

    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        warn_unused_crops(crops)
        x1, x2 = crops[0], crops[1]
        z1, q1 = self.student(x1)
        _, q2 = self.student(x2)
        with torch.no_grad():  # the momentum encoder: train mode, no gradients
            k1 = self.teacher(x1)
            k2 = self.teacher(x2)
        loss = moco_v3_loss(q1, q2, k1, k2, self.temperature)
        return loss, {"momentum": self.momentum(step), **representation_stats(z1, k1, k2)}

