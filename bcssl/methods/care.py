"""CARE (Ge et al., NeurIPS 2021): a Transformer stream that supervises the CNN stream, as the
official code builds and trains it (ChongjianGE/CARE ``models/care_module.py``,
``models/resnet_care.py``, ``models/trans.py``, ``exps/arxiv/care_exp.py``). Settings:
``method.care.*``.

- **C-stream** = BYOL on the CNN: backbone -> pooled features -> projector -> predictor, against
  the momentum network's projection of the other view. CARE's MLPs (resnet_care.py ``fc1``/``fc2``,
  ``MLP="care"``): projector Linear(D, 4096) -> BN -> ReLU -> Linear(4096, 256), predictor
  Linear(256, 4096) -> BN -> ReLU -> Linear(4096, 256), **every Linear with a bias** (BYOL's last
  Linear has none); the predictor reads the projection as it is, the loss compares L2-normalised
  outputs.
- **T-stream** (``TransStack(dim=1024, fmap_size=14, dim_out=2048, proj_factor=4, downsample=True,
  heads=4, num_layers=5, dim_head=128, rel_pos_emb=False)`` on ResNet-50's ``layer3`` map): the
  backbone's stage map before the last (``feature_info[-2]``, ``layer3`` of ResNet-50, stage 3
  of BC-SSL) -> ``blocks`` BoTNet bottleneck blocks from ``dim`` = that map's channels to
  ``dim_out`` = the last stage's channels (1024 -> 2048 for ResNet-50, the T-stream standing in
  for ``layer4``) -> global average pool -> its own projector and predictor (as the C-stream's).
  :class:`BottleBlock` follows trans.py: shortcut = identity, or (first block, ``downsample``)
  a 3x3 stride-2 conv -> BN -> ReLU; body = 1x1 conv to ``dim_out / proj_factor`` -> BN -> ReLU ->
  multi-head self-attention (``heads`` x ``dim_head``, its own width ``heads * dim_head``) ->
  2x2 average pool (first block, ``downsample``) -> BN -> ReLU -> 1x1 conv to ``dim_out`` -> BN;
  output ReLU(body + shortcut). Attention: q scaled by ``dim_head ** -0.5``, logits
  ``q.k + q.pos`` with BoTNet's absolute position embedding ``pos = height[i] + width[j]`` (two
  tables ``(size, dim_head)``, normal * ``dim_head ** -0.5``, shared by the heads); the first
  block attends on the ``fmap_size`` map, the next ones on the halved map (7 x 7).
- **Init**: the T-stream is an attribute of CARE's ResNet, whose init loop runs after it is
  built: every conv kaiming-normal (fan-out, ReLU), every BatchNorm2d weight 1 and bias 0 --
  which also overwrites trans.py's zero-init of each block's last BN. Linears: PyTorch's default.
- **Loss** (care_module.py): ``con_loss + con2_loss + lambda_fea * fea_loss`` with the BYOL terms
  of both streams (``4 - 2 (q1.k1 + q2.k2)`` averaged: the two directions summed) and
  ``fea_loss = MSE(q1, aq1') + MSE(q2, aq2') + MSE(k1, ak1') + MSE(k2, ak2')`` (``nn.MSELoss``:
  mean over batch and dimensions) between the C-stream and the detached T-stream outputs, for the
  online predictions and the momentum projections (the latter carry no gradient: they only
  change the loss value, as in the official code). ``lambda_fea`` = 100.
- **Momentum network** = EMA (parameters only) of backbone + both projectors + the T-stream,
  momentum cosine ``method.care.momentum`` (0.99) -> 1 (``get_param_momentum``); train mode, no
  gradients. The official code applies the update at the start of step t with m_t; here right
  after optimiser step t (the same update, one schedule step earlier).
- **Optimiser**: SGD over ``student_encoder.parameters()`` with ``weight_decay=1e-4``: every
  student parameter decayed, biases and norms too (:meth:`CARE.param_groups`).
- Two views (the first two crops; BYOL's augmentation). Evaluation uses the online CNN backbone
  (the T-stream is dropped after pre-training, as in CARE's linear evaluation).

The stage maps come from the backbone contract (``forward_intermediates``), so CARE runs on any
registered backbone with at least two stage maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcssl.methods.base import backbone_from_config, decay_all_param_groups, frozen_copy
from bcssl.methods.byol import (OnlineTargetMethod, byol_loss, representation_stats,
                                warn_unused_crops)


class CAREMLP(nn.Sequential):
    """resnet_care.py ``fc1``/``fc2`` halves: Linear(bias) -> BN -> ReLU -> Linear(bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class AbsPosEmb(nn.Module):
    """trans.py ``AbsPosEmb``: ``emb[(i, j)] = height[i] + width[j]``; logits ``q . emb``."""

    def __init__(self, fmap_size: int, dim_head: int):
        super().__init__()
        scale = dim_head ** -0.5
        self.height = nn.Parameter(torch.randn(fmap_size, dim_head) * scale)
        self.width = nn.Parameter(torch.randn(fmap_size, dim_head) * scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # q: (b, heads, h*w, d)
        emb = (self.height[:, None, :] + self.width[None, :, :]).reshape(-1, self.height.shape[1])
        return q @ emb.t()


class Attention(nn.Module):
    """trans.py ``Attention``: all-to-all multi-head self-attention over an (H, W) map."""

    def __init__(self, dim: int, fmap_size: int, heads: int = 4, dim_head: int = 128):
        super().__init__()
        self.heads, self.dim_head, self.fmap_size = heads, dim_head, fmap_size
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.pos_emb = AbsPosEmb(fmap_size, dim_head)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, _, h, w = fmap.shape
        if (h, w) != (self.fmap_size, self.fmap_size):
            # TransStack asserts the map size: its position tables are for this size only
            raise ValueError(f"CARE's T-stream was built for {self.fmap_size}x{self.fmap_size} maps "
                             f"(method.care.fmap_size) but got {h}x{w}; set method.care.fmap_size to the side "
                             "of the backbone's stage-3 map at the crop size (crops.global_size)")
        q, k, v = (t.reshape(b, self.heads, self.dim_head, h * w).transpose(-2, -1)
                   for t in self.to_qkv(fmap).chunk(3, dim=1))
        q = q * self.scale
        sim = q @ k.transpose(-2, -1) + self.pos_emb(q)  # (b, heads, hw, hw)
        out = sim.softmax(dim=-1) @ v  # (b, heads, hw, d)
        return out.transpose(-2, -1).reshape(b, self.heads * self.dim_head, h, w)


class BottleBlock(nn.Module):
    """trans.py ``BottleBlock`` (BoTNet bottleneck with ReLU activations; see the module docstring)."""

    def __init__(self, dim: int, fmap_size: int, dim_out: int, proj_factor: int, downsample: bool,
                 heads: int = 4, dim_head: int = 128):
        super().__init__()
        if dim != dim_out or downsample:
            kernel, stride, padding = (3, 2, 1) if downsample else (1, 1, 0)
            self.shortcut = nn.Sequential(nn.Conv2d(dim, dim_out, kernel, stride=stride, padding=padding, bias=False),
                                          nn.BatchNorm2d(dim_out), nn.ReLU(inplace=True))
        else:
            self.shortcut = nn.Identity()
        attn_in, attn_out = dim_out // proj_factor, heads * dim_head
        if attn_in < 1:
            raise ValueError(f"CARE T-stream: width {dim_out} / proj_factor {proj_factor} leaves no channels")
        self.net = nn.Sequential(
            nn.Conv2d(dim, attn_in, 1, bias=False), nn.BatchNorm2d(attn_in), nn.ReLU(inplace=True),
            Attention(attn_in, fmap_size, heads, dim_head),
            nn.AvgPool2d((2, 2)) if downsample else nn.Identity(),
            nn.BatchNorm2d(attn_out), nn.ReLU(inplace=True),
            nn.Conv2d(attn_out, dim_out, 1, bias=False), nn.BatchNorm2d(dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(x) + self.shortcut(x))


class TransStack(nn.Module):
    """trans.py ``TransStack``: ``blocks`` bottleneck blocks, the first from ``dim`` to ``dim_out``
    (and downsampling), the next ones at ``dim_out`` on the ``fmap_size // 2`` map."""

    def __init__(self, dim: int, fmap_size: int, dim_out: int, proj_factor: int = 4, downsample: bool = True,
                 heads: int = 4, blocks: int = 5, dim_head: int = 128):
        super().__init__()
        layers = []
        for i in range(blocks):
            first = i == 0
            size = fmap_size // (2 if downsample and not first else 1)
            layers.append(BottleBlock(dim if first else dim_out, size, dim_out, proj_factor, first and downsample,
                                      heads, dim_head))
        self.net = nn.Sequential(*layers)
        # resnet_care.py's init loop over ResNet.modules(), which include the T-stream
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def transformer_stream(backbone: nn.Module, cfg) -> TransStack:
    """The T-stream for ``backbone``: from its stage map before the last to the last stage's width."""
    info = backbone.feature_info
    if len(info) < 2:
        raise ValueError(f"CARE's T-stream reads the stage-3 map (the stage map before the last); "
                         f"{type(backbone).__name__} has {len(info)} stage map(s) (a ViT has one)")
    return TransStack(info[-2].channels, cfg.fmap_size, info[-1].channels, cfg.proj_factor, cfg.downsample,
                      cfg.heads, cfg.blocks, cfg.dim_head)


class CAREEncoder(nn.Module):
    """Backbone + C-stream projector + T-stream (+ its projector): ``forward(x) -> (z_c, z_t)``
    from one backbone pass. (resnet_care.py L2-normalises the projections of the momentum network
    and the predictions of the online one, not the online projections the predictors read; the
    loss normalises what it compares.)"""

    def __init__(self, backbone: nn.Module, c_projector: nn.Module, t_stream: TransStack, t_projector: nn.Module):
        super().__init__()
        self.backbone, self.c_projector = backbone, c_projector
        self.t_stream, self.t_projector = t_stream, t_projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, maps = self.backbone.forward_intermediates(x)
        t = self.t_stream(maps[-2]).mean(dim=(2, 3))
        return self.c_projector(self.backbone.forward_head(final)), self.t_projector(t)


class CAREOnline(nn.Module):
    """Online network: encoder + one predictor per stream -> ``(z_c, z_t, p_c, p_t)``."""

    def __init__(self, encoder: CAREEncoder, c_predictor: nn.Module, t_predictor: nn.Module):
        super().__init__()
        self.encoder, self.c_predictor, self.t_predictor = encoder, c_predictor, t_predictor

    def forward(self, x: torch.Tensor):
        z_c, z_t = self.encoder(x)
        return z_c, z_t, self.c_predictor(z_c), self.t_predictor(z_t)


def care_loss(c: tuple, t: tuple, lam: float) -> tuple[torch.Tensor, dict]:
    """``c = (p1_c, p2_c, z1_c', z2_c')``: the online C-stream predictions of the two views and the
    momentum C-stream projections of the two views; ``t`` the same for the T-stream. Returns the
    total and its three parts (care_module.py ``CARE.forward``)."""
    loss_c = byol_loss(*c)
    loss_t = byol_loss(*t)
    # nn.MSELoss() (mean over batch AND dimensions) between the normalised C and T outputs of each
    # view, online predictions and momentum projections, the T side detached (it supervises C).
    attn = sum(F.mse_loss(F.normalize(pc.float(), dim=-1), F.normalize(pt.detach().float(), dim=-1))
               for pc, pt in zip(c, t))
    return loss_c + loss_t + lam * attn, {"loss_c": loss_c.detach(), "loss_t": loss_t.detach(),
                                          "loss_attn": attn.detach()}


class CARE(OnlineTargetMethod):
    """C-stream (BYOL on the CNN) + T-stream (Transformer on stage 3) + T -> C supervision."""

    def __init__(self, model_cfg, method_cfg):
        super().__init__()
        m = method_cfg.care  # method.care.*
        self.cfg = m
        self.base_momentum = float(m.momentum)

        def encoder(bb: nn.Module) -> CAREEncoder:
            t_stream = transformer_stream(bb, m)
            return CAREEncoder(bb, CAREMLP(bb.num_features, m.proj_hidden_dim, m.proj_dim), t_stream,
                               CAREMLP(bb.feature_info[-1].channels, m.proj_hidden_dim, m.proj_dim))

        online_encoder = encoder(backbone_from_config(model_cfg))
        self.student = CAREOnline(online_encoder, CAREMLP(m.proj_dim, m.proj_hidden_dim, m.proj_dim),
                                  CAREMLP(m.proj_dim, m.proj_hidden_dim, m.proj_dim))
        self.teacher = frozen_copy(encoder(backbone_from_config(model_cfg, drop_path_rate=0.0)), online_encoder)

    def param_groups(self) -> list[dict]:
        """care_exp.py: ``SGD(model.student_encoder.parameters(), weight_decay=1e-4)`` -- every
        student parameter decayed, biases and norms included."""
        return decay_all_param_groups(self.student)

    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        warn_unused_crops(crops)
        x1, x2 = crops[0], crops[1]
        z1_c, _, p1_c, p1_t = self.student(x1)
        _, _, p2_c, p2_t = self.student(x2)
        with torch.no_grad():  # the momentum network: train mode, no gradients
            k1_c, k1_t = self.teacher(x1)
            k2_c, k2_t = self.teacher(x2)
        loss, parts = care_loss((p1_c, p2_c, k1_c, k2_c), (p1_t, p2_t, k1_t, k2_t), self.cfg.lambda_fea)
        return loss, {"momentum": self.momentum(step), **parts, **representation_stats(z1_c, k1_c, k2_c)}
