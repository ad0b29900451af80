"""MoCo v3's ViT-S/16, as facebookresearch/moco-v3 ``vits.py`` builds it (``VisionTransformerMoCo``,
``vit_small``), registered as ``vit_s16_mocov3``.

What differs from DINO's / timm's ViT-S/16 (``vit_s16``), every detail from ``vits.py``:

- 12 heads of 32 dims (timm / DINO: 6 of 64); same widths (384, MLP 1536), depth 12, qkv bias,
  LayerNorm eps 1e-6, so the same parameter count;
- a fixed 2-D sin-cos position embedding (``build_2d_sincos_position_embedding``, temperature
  1e4), the cls token's position being zero; it is a parameter with ``requires_grad=False``;
- init: every ``nn.Linear`` xavier-uniform with zero bias, except ``qkv``, whose bound treats Q,
  K and V as three matrices (``sqrt(6 / (out / 3 + in))``); cls token normal(std 1e-6); the patch
  projection xavier-uniform over the flattened patch (``sqrt(6 / (3 p p + D))``), zero bias.

The random patch projection itself (``--stop-grad-conv1``: the projection frozen at this init)
is MoCo v3's training choice, ``method.moco_v3.stop_grad_conv1``; the method freezes the
backbone's ``patch_projection`` (the contract's hook), so it works with any ViT.
"""
from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .baselines import (BCSSL_DEFAULT_DW_NORM, BCSSL_DEFAULT_KERNEL_SIZE, BCSSL_DEFAULT_LAYER_SCALE, ViTBackbone,
                        vit_backbone, vit_timm_kwargs)
from .registry import register_backbone


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``(1, 1 + grid_h * grid_w, dim)``: a zero row for the cls token, then moco-v3's
    ``build_2d_sincos_position_embedding`` table: ``[sin(w w_k), cos(w w_k), sin(h w_k), cos(h w_k)]``
    with ``w_k = temperature ** (-k / (dim / 4))``. As in ``vits.py``, the coordinates come from
    ``torch.meshgrid(arange(w), arange(h))`` (``'ij'`` indexing) flattened in that order, so on the
    square grids MoCo v3 uses, the first ("w") half of the table varies along the token rows."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coord_w, coord_h = torch.meshgrid(torch.arange(grid_w, dtype=torch.float32),
                                      torch.arange(grid_h, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = coord_w.flatten()[:, None] * omega[None]
    out_h = coord_h.flatten()[:, None] * omega[None]
    table = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


@torch.no_grad()
def mocov3_init_(vit: VisionTransformer) -> None:
    """``VisionTransformerMoCo.__init__``: fixed sin-cos position embedding and moco-v3's init."""
    grid_h, grid_w = vit.patch_embed.grid_size
    if vit.num_prefix_tokens != 1:
        raise ValueError("MoCo v3's ViT has exactly one prefix token (cls)")
    vit.pos_embed = nn.Parameter(sincos_position_embedding(grid_h, grid_w, vit.embed_dim), requires_grad=False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # treat the weights of Q, K, V separately
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    val = math.sqrt(6.0 / float(proj.weight[0].numel() + vit.embed_dim))  # 3 * p * p + D for RGB
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)


@register_backbone("vit_s16_mocov3")
def vit_s16_mocov3(
    *,
    kernel_size=BCSSL_DEFAULT_KERNEL_SIZE,
    dw_norm=BCSSL_DEFAULT_DW_NORM,
    stem_stride: int = 4,
    drop_path_rate: float = 0.0,
    depths=None,
    dims=None,
    layer_scale_init=BCSSL_DEFAULT_LAYER_SCALE,
    img_size=224,
    in_chans: int = 3,
    dynamic_img_size: bool = True,
) -> ViTBackbone:
    """MoCo v3's ViT-S/16 (moco-v3 ``vits.vit_small``): 12 blocks, width 384, **12 heads**, fixed
    2-D sin-cos position embedding, moco-v3's init; cls-token pooling.

    Same keyword arguments as ``vit_s16``; ``dims`` (a tiny width for tests) keeps moco-v3's head
    width of 32 (heads = width / 32). With ``dynamic_img_size`` another input size interpolates the
    sin-cos table (timm's resampling); MoCo v3 trains at ``img_size`` only, where it is exact.
    """
    name = "vit_s16_mocov3"
    kw, patch, hw = vit_timm_kwargs(
        name, kernel_size=kernel_size, dw_norm=dw_norm, stem_stride=stem_stride, drop_path_rate=drop_path_rate,
        depths=depths, dims=dims, layer_scale_init=layer_scale_init, img_size=img_size, in_chans=in_chans,
        dynamic_img_size=dynamic_img_size, head_dim=32)
    kw = {"embed_dim": 384, "depth": 12, "num_heads": 12, **kw}  # moco-v3 vit_small
    model = VisionTransformer(mlp_ratio=4, qkv_bias=True, num_classes=0, **kw)
    mocov3_init_(model)
    return vit_backbone(model, name, patch, hw, dynamic_img_size)
