"""CARE (Ge et al., NeurIPS 2021): a Transformer stream that supervises the CNN stream.

Every detail is in this file (PAPER.md section 3; official code ChongjianGE/CARE):

- **C-stream** = BYOL on the CNN: backbone -> pooled features -> projector -> predictor, against
  the momentum (target) network's projection of the other view (``bcssl.methods.byol``).
- **T-stream**: the CNN's **stage-3** feature map -> ``care_blocks`` (5) BoTNet-style bottleneck
  blocks (1x1 conv -> multi-head self-attention with 4 heads and a learned 2-D position
  embedding -> 1x1 conv, BN, residual) -> global average pool -> its own projector -> its own
  predictor, also BYOL against the target T-stream.
- **Loss** = BYOL(C) + BYOL(T) + ``care_lambda`` (100) x MSE(C-stream prediction, T-stream
  prediction detached), both L2-normalised per sample (so the term is in [0, 4] like BYOL's
  regression): the Transformer stream is the teacher of the CNN stream's attention, not the
  other way round.
- Target network = EMA (parameters only) of backbone + both projectors + the T-stream blocks,
  momentum cosine ``method.momentum_teacher`` (0.99) -> 1; train mode, no gradients.
- Two views (the first two crops; ``crops.n_local=0`` and ``crops.global_scale=[0.08, 1]``: BYOL's
  augmentation). Evaluation uses the online CNN backbone (the T-stream is dropped after
  pre-training, as in CARE).

The stage-3 map comes from :func:`stage3_and_pooled`, which supports every ``bcssl_*`` variant
(stage index 2) and the timm ResNet-50 (``layer3``) in one backbone pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcssl.methods.base import backbone_from_config, frozen_copy
from bcssl.methods.byol import (BYOLMLP, OnlineTargetMethod, byol_loss, representation_stats,
                                warn_unused_crops)
from bcssl.models.bcssl_convnext import BCSSLConvNeXt


def stage3_and_pooled(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stage-3 feature map (B, C3, H, W), pooled final features (B, D))`` in one pass."""
    if isinstance(backbone, BCSSLConvNeXt):
        if min(x.shape[-2:]) < backbone.min_input_size:
            backbone.forward_features(x)  # raises its clear "input too small" error
        h = backbone.stem(x)
        for i, stage in enumerate(backbone.stages):
            h = stage(h)
            if i == 2:
                s3 = h
        return s3, backbone.forward_head(h)
    if getattr(backbone, "family", None) == "resnet":
        m = backbone.model
        h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        s3 = m.layer3(m.layer2(m.layer1(h)))
        return s3, m.forward_head(m.layer4(s3), pre_logits=True)
    raise ValueError(f"CARE needs a stage-3 feature map: supported backbones are bcssl_* and resnet50, "
                     f"not {type(backbone).__name__}")


def stage3_channels(backbone: nn.Module) -> int:
    if isinstance(backbone, BCSSLConvNeXt):
        return int(backbone.dims[2])
    if getattr(backbone, "family", None) == "resnet":
        return int(backbone.model.layer3[-1].conv3.out_channels)
    return stage3_and_pooled(backbone, torch.zeros(1, 3, 64, 64))[0].shape[1]  # raises the clear error


class MHSA2d(nn.Module):
    """BoTNet's all-to-all self-attention over an (H, W) map, ``heads`` heads, with a learned 2-D
    position embedding (height + width parts) added to the keys' content logits as q . r.
    The embedding is learned at ``pos_size`` x ``pos_size`` and resized to the map, so the same
    module serves any crop size."""

    def __init__(self, dim: int, heads: int = 4, pos_size: int = 14):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MHSA width {dim} is not divisible by {heads} heads")
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(1, dim, pos_size, 1) * self.dh ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(1, dim, 1, pos_size) * self.dh ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, self.dh, h * w).unbind(1)
        pos = F.interpolate(self.rel_h, size=(h, 1), mode="bilinear", align_corners=False) + \
            F.interpolate(self.rel_w, size=(1, w), mode="bilinear", align_corners=False)
        pos = pos.reshape(1, self.heads, self.dh, h * w)
        logits = (q.transpose(-2, -1) @ k + q.transpose(-2, -1) @ pos) * self.dh ** -0.5  # (b, heads, hw, hw)
        out = v @ logits.softmax(dim=-1).transpose(-2, -1)  # (b, heads, dh, hw)
        return out.reshape(b, c, h, w)


class BoTBlock(nn.Module):
    """BoTNet bottleneck: 1x1 conv -> BN-ReLU -> MHSA -> BN-ReLU -> 1x1 conv -> BN, + residual, ReLU."""

    def __init__(self, dim: int, heads: int = 4, pos_size: int = 14, reduction: int = 4):
        super().__init__()
        mid = max(heads, (dim // reduction) // heads * heads)
        self.body = nn.Sequential(
            nn.Conv2d(dim, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            MHSA2d(mid, heads, pos_size), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, dim, 1, bias=False), nn.BatchNorm2d(dim))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity (zero-init last BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class TStream(nn.Module):
    """``care_blocks`` BoTNet blocks on the stage-3 map -> global average pool -> projector."""

    def __init__(self, dim: int, blocks: int, heads: int, pos_size: int, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.blocks = nn.Sequential(*[BoTBlock(dim, heads, pos_size) for _ in range(blocks)])
        self.projector = BYOLMLP(dim, proj_hidden, proj_dim)

    def forward(self, s3: torch.Tensor) -> torch.Tensor:
        return self.projector(self.blocks(s3).mean(dim=(2, 3)))


class CAREEncoder(nn.Module):
    """Backbone + C-stream projector + T-stream: ``forward(x) -> (z_c, z_t)`` from one backbone pass."""

    def __init__(self, backbone: nn.Module, c_projector: nn.Module, t_stream: TStream):
        super().__init__()
        self.backbone, self.c_projector, self.t_stream = backbone, c_projector, t_stream

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s3, pooled = stage3_and_pooled(self.backbone, x)
        return self.c_projector(pooled), self.t_stream(s3)


class CAREOnline(nn.Module):
    """Online network: encoder + one predictor per stream -> ``(z_c, z_t, p_c, p_t)``."""

    def __init__(self, encoder: CAREEncoder, c_predictor: nn.Module, t_predictor: nn.Module):
        super().__init__()
        self.encoder, self.c_predictor, self.t_predictor = encoder, c_predictor, t_predictor

    def forward(self, x: torch.Tensor):
        z_c, z_t = self.encoder(x)
        return z_c, z_t, self.c_predictor(z_c), self.t_predictor(z_t)


def care_loss(c: tuple, t: tuple, lam: float) -> tuple[torch.Tensor, dict]:
    """``c = (p1_c, p2_c, z1_c', z2_c')``, ``t`` the same for the T-stream (targets from the
    momentum network). Returns the total and its three parts."""
    loss_c = byol_loss(*c)
    loss_t = byol_loss(*t)
    # The official code: nn.MSELoss() (mean over batch AND dimensions) between the normalised C and
    # T predictions of each view, summed over the two views; the T side detached (it supervises C).
    # With lambda = 100 this weighs ~100 / dim per unit of squared distance: a per-vector sum
    # instead would make the T -> C pull `dim` times stronger and swamp the C-stream's BYOL loss.
    attn = sum(F.mse_loss(F.normalize(pc.float(), dim=-1), F.normalize(pt.detach().float(), dim=-1))
               for pc, pt in ((c[0], t[0]), (c[1], t[1])))
    return loss_c + loss_t + lam * attn, {"loss_c": loss_c.detach(), "loss_t": loss_t.detach(),
                                          "loss_attn": attn.detach()}


class CARE(OnlineTargetMethod):
    """C-stream (BYOL on the CNN) + T-stream (Transformer on stage 3) + T -> C supervision."""

    def __init__(self, model_cfg, method_cfg):
        super().__init__()
        m = method_cfg
        self.cfg = m
        backbone = backbone_from_config(model_cfg)
        c3 = stage3_channels(backbone)

        def encoder(bb: nn.Module) -> CAREEncoder:
            return CAREEncoder(bb, BYOLMLP(bb.num_features, m.proj_hidden_dim, m.proj_dim),
                               TStream(c3, m.care_blocks, m.care_heads, m.care_pos_size, m.proj_hidden_dim, m.proj_dim))

        online_encoder = encoder(backbone)
        self.student = CAREOnline(online_encoder, BYOLMLP(m.proj_dim, m.proj_hidden_dim, m.proj_dim),
                                  BYOLMLP(m.proj_dim, m.proj_hidden_dim, m.proj_dim))
        self.teacher = frozen_copy(encoder(backbone_from_config(model_cfg, drop_path_rate=0.0)), online_encoder)

    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        warn_unused_crops(crops)
        x1, x2 = crops[0], crops[1]
        z1_c, _, p1_c, p1_t = self.student(x1)
        _, _, p2_c, p2_t = self.student(x2)
        with torch.no_grad():  # the momentum network: train mode, no gradients
            k1_c, k1_t = self.teacher(x1)
            k2_c, k2_t = self.teacher(x2)
        loss, parts = care_loss((p1_c, p2_c, k1_c, k2_c), (p1_t, p2_t, k1_t, k2_t), self.cfg.care_lambda)
        return loss, {"momentum": self.momentum(step), **parts, **representation_stats(z1_c, k1_c, k2_c)}

