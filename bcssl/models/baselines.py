"""Baseline backbones the paper compares with, built by timm at random init (never downloaded).

Registered names (the paper's baselines, Tables 1, 3, 5; docs/recipe.md section 6):

- ``resnet50``   ResNet-50 (23.5 M backbone params; 25.6 M with a 1000-way classifier),
                 initialised as torchvision's (``zero_init_last`` for BYOL's / MoCo v3's init)
- ``convnext_t`` vanilla ConvNeXt-T, LayerNorm only, depthwise kernel 7 by default
                 (27.8 M; 28.6 M with classifier); ``kernel_size`` 3/5/7/9/15 for Table 1/2
- ``vit_s16``    DINO's ViT-S/16: 6 heads, learned position embedding (21.7 M; 22.1 M with
                 classifier). MoCo v3's ViT-S/16 is ``vit_s16_mocov3`` (``vit_mocov3.py``)
- ``swin_t``     Swin-T, patch 4, window 7 (27.5 M; 28.3 M with classifier)

Every factory takes the BC-SSL factories' keyword arguments (``kernel_size``, ``dw_norm``,
``stem_stride``, ``drop_path_rate``, ``depths``, ``dims``, ``layer_scale_init``, ``in_chans``)
plus ``img_size``. A value a model can honour is used; anything else is a ``ValueError``. The
values the BC-SSL defaults (and so ``model.*`` in the config) carry when left alone -- kernel 9,
``dw_norm='bn+ln'``, layer scale 1e-6 -- and ``None`` mean "not set" for models that have no such
thing (ResNet/ViT/Swin have no depthwise conv). ``convnext_t`` *is* a depthwise-conv model, so
it honours ``kernel_size`` (default 7) and only accepts ``dw_norm='ln'`` (vanilla ConvNeXt;
``bcssl_t`` is the model with BN after the depthwise conv).

``stem_stride`` (4 = the standard stem, 2 and 1 for small images) scales every model's total
stride by ``stem_stride / 4``, as for BC-SSL: ResNet drops the stem max-pool (2) and also the
stride of its first conv (1); ConvNeXt and Swin use a ``stem_stride`` patch; ViT uses a
``4 * stem_stride`` patch (16, 8, 4).

Input sizes (checked with a clear ``ValueError`` before timm's own asserts):

- CNNs: any side >= ``min_input_size`` = 8 * stem_stride (32 px at the standard stem).
- ``vit_s16``: sides that are multiples of the patch (16 px at the standard stem), at least one
  patch. With ``dynamic_img_size=True`` (default; DINO's local crops need it) one model takes any
  such size and interpolates its position embedding from the ``img_size`` grid (free at
  ``img_size``); with ``False`` the input must be exactly ``img_size``.
- ``swin_t``: with timm 1.0.31 sides only need to be multiples of the patch size (4 px): timm
  pads odd feature maps before patch merging and pads (or, for maps no larger than the window,
  shrinks) the 7x7 windows, so 32, 36, 64, 96, 224 ... all work; 224 = 4 x 7 x 8 is only the
  size at which no padding happens. ``dynamic_img_size=True`` (default) computes the shifted-
  window masks per forward so one model takes every such size; ``False`` precomputes them for
  ``img_size`` only (what the throughput benchmark uses).

Each model is wrapped in a :class:`TimmBackbone` subclass (one per family: ResNet, ConvNeXt, ViT,
Swin), which gives the backbone contract of ``bcssl/models/contract.py``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn

from .bcssl_convnext import _kernel_sizes
from .contract import Backbone, StageInfo, TimmConvNeXtLayout
from .registry import register_backbone

# Values the BC-SSL factories (and the config's model.* keys) use by default; for a model without
# that feature they mean "not set".
BCSSL_DEFAULT_KERNEL_SIZE = 9
BCSSL_DEFAULT_DW_NORM = "bn+ln"
BCSSL_DEFAULT_LAYER_SCALE = 1e-6
STEM_STRIDES = (4, 2, 1)

# Names whose factory honours ``kernel_size`` (the throughput benchmark passes it to these only)
# and names that take ``img_size`` / ``dynamic_img_size``.
KERNEL_SIZE_BASELINES = ("convnext_t",)
IMG_SIZE_BASELINES = ("vit_s16", "swin_t")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def _unset(value, bcssl_default) -> bool:
    return value is None or (value == bcssl_default and type(value) is type(bcssl_default))


def _reject(name: str, key: str, value, why: str) -> None:
    raise ValueError(f"{name} does not support {key}={value!r}: {why}")


def _check_common(name: str, stem_stride, drop_path_rate, in_chans) -> int:
    if not _is_int(stem_stride) or stem_stride not in STEM_STRIDES:
        raise ValueError(
            f"{name}: stem_stride must be one of {', '.join(map(str, STEM_STRIDES))}; got {stem_stride!r}"
        )
    if not isinstance(drop_path_rate, numbers.Real) or not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if not _is_int(in_chans) or in_chans < 1:
        raise ValueError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
    return int(stem_stride)


def _no_depthwise(name: str, kernel_size, dw_norm) -> None:
    """ResNet/ViT/Swin have no depthwise conv: kernel_size / dw_norm must be left unset."""
    if not _unset(kernel_size, BCSSL_DEFAULT_KERNEL_SIZE):
        _reject(name, "kernel_size", kernel_size,
                "it has no depthwise conv (use bcssl_* or convnext_t for a kernel-size study)")
    if not _unset(dw_norm, BCSSL_DEFAULT_DW_NORM):
        _reject(name, "dw_norm", dw_norm,
                "it has no depthwise conv (dw_norm applies to bcssl_* only; convnext_t is 'ln')")


def _four_ints(name: str, key: str, value) -> tuple[int, ...]:
    if _is_seq(value) and len(value) == 4 and all(_is_int(v) and v > 0 for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name}: {key} must be 4 positive ints (one per stage), got {value!r}")


def _one_int(name: str, key: str, value) -> int:
    """ViT has one depth and one width: accept an int or a 1-element list."""
    if _is_seq(value) and len(value) == 1:
        value = value[0]
    if _is_int(value) and value > 0:
        return int(value)
    raise ValueError(f"{name}: {key} must be one positive int (ViT has a single stage), got {value!r}")


def _side(img_size) -> tuple[int, int]:
    if _is_int(img_size):
        return int(img_size), int(img_size)
    if _is_seq(img_size) and len(img_size) == 2 and all(_is_int(s) for s in img_size):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")


def _cnn_reductions(stem_stride: int) -> tuple[int, ...]:
    """Strides of the 4 stage maps of a CNN whose standard stem (stride 4) is scaled to ``stem_stride``."""
    return tuple(stem_stride * 2 ** i for i in range(4))


def _create_timm(arch: str, **kwargs) -> nn.Module:
    # pretrained=False: random init, nothing is ever downloaded; num_classes=0: no classifier.
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


class TimmBackbone(Backbone):
    """A timm model (``num_classes=0``) behind the bcssl backbone contract (``contract.py``).

    One subclass per family says what differs: which timm stages are the stage maps, the CAM
    target layer and its reshape, the patch projection, the timm-ConvNeXt export layout.

    - ``forward(x) -> (B, num_features)``: timm ``forward_features`` + ``forward_head(pre_logits=True)``
      (ResNet/ConvNeXt/Swin: global average pool (+ LayerNorm for ConvNeXt); ViT: cls token).
    - ``forward_intermediates(x)``: timm's final features and the stage maps (timm's
      ``forward_intermediates`` at the family's stage indices; ViT: its one map of patch tokens);
      ``forward_head(final)``: timm's ``forward_head(pre_logits=True)``.
    - ``forward_features(x) -> (B, C, H', W')``: CNN maps as they are, ViT patch tokens (cls
      dropped) reshaped to the patch grid, Swin NHWC permuted to NCHW.
    - ``min_input_size``: smallest input side.

    Args:
        model: the timm model, built with ``num_classes=0``.
        name: registry name (for messages).
        min_input_size: smallest input side.
        reductions: the stride of each stage map with respect to the input.
        multiple_of: input sides must be multiples of this (the ViT/Swin patch size; 1 for CNNs).
        fixed_size: ``(H, W)`` the input must match exactly (ViT/Swin built without
            ``dynamic_img_size``), or ``None``.
    """

    family = ""  # informational (repr); behaviour lives in the subclasses
    stage_indices: tuple[int, ...] = (0, 1, 2, 3)  # timm forward_intermediates indices of the stage maps

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        min_input_size: int,
        reductions: Sequence[int],
        multiple_of: int = 1,
        fixed_size: Optional[tuple[int, int]] = None,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)
        self.in_chans = int(getattr(model, "in_chans", 3))
        self._min_input_size = int(min_input_size)
        self._reductions = tuple(int(r) for r in reductions)
        self.multiple_of = int(multiple_of)
        self.fixed_size = fixed_size

    # -- contract ---------------------------------------------------------------------------------
    @property
    def min_input_size(self) -> int:
        """Smallest input side (CNNs: the total stride; ViT/Swin: one patch)."""
        return self._min_input_size

    @property
    def feature_info(self) -> list[StageInfo]:
        info = self.model.feature_info  # timm's, at the standard stem: only channels and names are used
        return [StageInfo(int(info[i]["num_chs"]), r, str(info[i]["module"]))
                for i, r in zip(self.stage_indices, self._reductions)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map ``(B, C, H', W')`` before pooling."""
        return self._timm_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` (timm's pre-logits)."""
        return self.model.forward_head(self._timm_features(x), pre_logits=True)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(final features, stage maps)`` in one pass (timm's ``forward_intermediates``)."""
        self.check_input_size(x.shape[-2], x.shape[-1])
        # norm=True: Swin's last map gets its final norm, as forward_features (a no-op for ResNet/ConvNeXt)
        return self.model.forward_intermediates(x, indices=list(self.stage_indices), norm=True, output_fmt="NCHW")

    def forward_head(self, final: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(final, pre_logits=True)

    # -- helpers ----------------------------------------------------------------------------------
    def _timm_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.model.forward_features(x)

    def check_input_size(self, h: int, w: int) -> None:
        """``ValueError`` naming the sizes that work when ``h x w`` does not."""
        h, w = int(h), int(w)
        if self.fixed_size is not None and (h, w) != tuple(self.fixed_size):
            fh, fw = self.fixed_size
            raise ValueError(
                f"{self.name} was built for {fh}x{fw} inputs (dynamic_img_size=False), got {h}x{w}; "
                f"build it with img_size={h} or dynamic_img_size=True"
            )
        m, k = self.min_input_size, self.multiple_of
        if h < m or w < m:
            raise ValueError(f"input {h}x{w} is too small for {self.name}: need at least {m}x{m}")
        if h % k or w % k:
            raise ValueError(
                f"input {h}x{w} does not fit {self.name}: both sides must be multiples of its "
                f"patch size {k} (e.g. {k * max(1, h // k)}x{k * max(1, w // k)})"
            )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family!r}, num_features={self.num_features}"


class ResNetBackbone(TimmBackbone):
    """timm ResNet: stage maps = ``layer1..layer4``; CAM on the last block of ``layer4``."""

    family = "resnet"
    stage_indices = (1, 2, 3, 4)  # timm's 0 is the stem's act1

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.model.layer4[-1]


class ConvNeXtBackbone(TimmBackbone):
    """timm ConvNeXt: stage maps = its 4 stages; CAM on the last block of the last stage."""

    family = "convnext"

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.model.stages[-1].blocks[-1]

    def timm_convnext(self) -> TimmConvNeXtLayout:
        m = self.model
        first = [s.blocks[0] for s in m.stages]
        return TimmConvNeXtLayout(
            tuple(len(s.blocks) for s in m.stages), tuple(b.conv_dw.out_channels for b in first),
            tuple(b.conv_dw.kernel_size[0] for b in first), int(getattr(self, "stem_stride", m.stem[0].stride[0])),
            self.in_chans, m.state_dict())


class ViTBackbone(TimmBackbone):
    """timm ViT: one stage map (the final, normalised patch tokens on the patch grid); CAM on
    ``norm1`` of the last block (docs/recipe.md section 5, CAM maps), reshaped from tokens to the grid."""

    family = "vit"
    #: the linear probe reads DINO's features: the class tokens of the last ``n_last_blocks`` blocks,
    #: each through the final norm, concatenated (facebookresearch/dino eval_linear.py,
    #: ``n_last_blocks=4``, ``avgpool_patchtokens=False`` for ViT-S): 4 x 384 = 1536-d
    n_last_blocks = 4
    linear_features_kind = "cls_last_4_blocks"

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._last_grid: Optional[tuple[int, int]] = None  # patch grid of the last input (for CAM)

    @property
    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(self.num_features, self.multiple_of, "norm")]

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.model.blocks[-1].norm1

    @property
    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._vit_tokens_to_map

    @property
    def patch_projection(self) -> nn.Module:
        return self.model.patch_embed.proj

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._vit_tokens_to_map(self._timm_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = self._timm_features(x)
        return tokens, [self._vit_tokens_to_map(tokens)]

    def linear_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        out = self.model.forward_intermediates(x, indices=self.n_last_blocks, return_prefix_tokens=True, norm=True,
                                               output_fmt="NLC", intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in out], dim=-1)

    def _timm_features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.multiple_of
        self._last_grid = (x.shape[-2] // p, x.shape[-1] // p)
        return super()._timm_features(x)

    def _vit_tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens ``(B, prefix + N, C)`` -> patch tokens as ``(B, C, h, w)`` (cls dropped)."""
        n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        patches = tokens[:, n_prefix:]
        b, n, c = patches.shape
        grid = self._last_grid
        if grid is None or grid[0] * grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"cannot infer the patch grid of {n} tokens; run forward on the input first")
            grid = (side, side)
        return patches.transpose(1, 2).reshape(b, c, grid[0], grid[1])


class SwinBackbone(TimmBackbone):
    """timm Swin: stage maps = its 4 stages (NHWC permuted to NCHW); CAM on ``norm1`` of the last
    block (docs/recipe.md section 5, CAM maps)."""

    family = "swin"

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.model.layers[-1].blocks[-1].norm1

    @property
    def cam_reshape(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return _nhwc_to_nchw

    @property
    def patch_projection(self) -> nn.Module:
        return self.model.patch_embed.proj

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc_to_nchw(self._timm_features(x))


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Swin's (B, H, W, C) activations -> (B, C, H, W)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, H, W, C) Swin activation, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# factories
# ------------------------------------------------------------------------------------------------


@register_backbone("resnet50")
def resnet50(
    *,
    kernel_size=BCSSL_DEFAULT_KERNEL_SIZE,
    dw_norm=BCSSL_DEFAULT_DW_NORM,
    stem_stride: int = 4,
    drop_path_rate: float = 0.0,
    depths=None,
    dims=None,
    layer_scale_init=BCSSL_DEFAULT_LAYER_SCALE,
    img_size=None,
    in_chans: int = 3,
    zero_init_last: Optional[bool] = None,
) -> TimmBackbone:
    """ResNet-50 (timm ``resnet50``, torchvision-style v1.5), random init.

    ``depths``: bottleneck blocks per stage (default 3,4,6,3); ``dims``: stage output widths
    (default 256,512,1024,2048, multiples of 4: the bottleneck width is dims/4).
    ``stem_stride`` 2 drops the stem max-pool, 1 also the stride of the 7x7 stem conv.

    Initialised as torchvision's ``resnet50()`` (kaiming-normal fan-out convs, BN 1/0), which DINO
    (main_dino.py: ``torchvision_models.__dict__[arch]()``) and CARE (models/resnet_care.py,
    ``zero_init_residual=False``) train. ``zero_init_last=True`` zero-initialises the last BN of
    every block instead, as timm's default, BYOL's haiku ResNet (``BlockV1``: ``batchnorm_2`` with
    ``scale_init=jnp.zeros``) and MoCo v3 (main_moco.py: ``zero_init_residual=True``). ``None``
    means False.
    """
    name = "resnet50"
    s = _check_common(name, stem_stride, drop_path_rate, in_chans)
    _no_depthwise(name, kernel_size, dw_norm)
    if not _unset(layer_scale_init, BCSSL_DEFAULT_LAYER_SCALE):
        _reject(name, "layer_scale_init", layer_scale_init, "ResNet has no layer scale")
    kw: dict = dict(drop_path_rate=float(drop_path_rate), in_chans=int(in_chans),
                    zero_init_last=bool(zero_init_last))  # timm defaults to True; torchvision to False
    if depths is not None:
        kw["layers"] = _four_ints(name, "depths", depths)
    if dims is not None:
        dims = _four_ints(name, "dims", dims)
        if any(d % 4 for d in dims):
            raise ValueError(f"{name}: dims (stage output widths) must be multiples of 4, got {dims}")
        kw["channels"] = tuple(d // 4 for d in dims)
    model = _create_timm("resnet50", **kw)
    if s <= 2:
        model.maxpool = nn.Identity()
    if s == 1:
        model.conv1.stride = (1, 1)
    min_size = 8 * s
    if img_size is not None and min(_side(img_size)) < min_size:
        raise ValueError(f"{name}: img_size {img_size} is below its minimum {min_size} (stem_stride={s})")
    return ResNetBackbone(model, name=name, min_input_size=min_size, reductions=_cnn_reductions(s))


@register_backbone("convnext_t")
def convnext_t(
    *,
    kernel_size=7,
    dw_norm="ln",
    stem_stride: int = 4,
    drop_path_rate: float = 0.0,
    depths=(3, 3, 9, 3),
    dims=(96, 192, 384, 768),
    layer_scale_init: Optional[float] = BCSSL_DEFAULT_LAYER_SCALE,
    img_size=None,
    in_chans: int = 3,
) -> TimmBackbone:
    """Vanilla ConvNeXt-T (timm ``convnext_tiny``): LayerNorm only, depthwise kernel 7 by default.

    ``kernel_size``: odd int 3..31 or one per stage (timm's ``kernel_sizes``). ``dw_norm`` must
    be ``'ln'`` (use ``bcssl_t`` for the BN after the depthwise conv). ``stem_stride`` s: an
    s x s stride-s patchify stem (total stride 8 s), as in BC-SSL.
    """
    name = "convnext_t"
    s = _check_common(name, stem_stride, drop_path_rate, in_chans)
    ks = _kernel_sizes(7 if kernel_size is None else kernel_size)
    if dw_norm not in (None, "ln"):
        _reject(name, "dw_norm", dw_norm,
                "convnext_t is vanilla ConvNeXt (LayerNorm only): pass dw_norm='ln' (config: model.dw_norm=ln); "
                "use bcssl_t for a BatchNorm after the depthwise conv")
    depths = _four_ints(name, "depths", depths if depths is not None else (3, 3, 9, 3))
    dims = _four_ints(name, "dims", dims if dims is not None else (96, 192, 384, 768))
    model = _create_timm(
        "convnext_tiny",
        depths=depths,
        dims=dims,
        kernel_sizes=ks,
        ls_init_value=layer_scale_init,
        drop_path_rate=float(drop_path_rate),
        in_chans=int(in_chans),
    )
    if s != 4:
        # timm turns a 2x2 patch stem into stride 4 by downsampling in stage 0; BC-SSL's
        # stem_stride means an s x s stride-s stem and no stage-0 downsampling, so swap the conv.
        old = model.stem[0]
        conv = nn.Conv2d(int(in_chans), dims[0], kernel_size=s, stride=s, bias=old.bias is not None,
                         device=old.weight.device, dtype=old.weight.dtype)
        nn.init.trunc_normal_(conv.weight, std=0.02)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        model.stem[0] = conv
    min_size = 8 * s
    if img_size is not None and min(_side(img_size)) < min_size:
        raise ValueError(f"{name}: img_size {img_size} is below its minimum {min_size} (stem_stride={s})")
    backbone = ConvNeXtBackbone(model, name=name, min_input_size=min_size, reductions=_cnn_reductions(s))
    backbone.kernel_sizes = ks
    backbone.dw_norm = "ln"
    backbone.stem_stride = s
    return backbone


def _check_img_size(name: str, img_size, patch: int) -> tuple[int, int]:
    hw = _side(img_size)
    if min(hw) < patch or hw[0] % patch or hw[1] % patch:
        raise ValueError(
            f"{name}: img_size {img_size} must be a positive multiple of the patch size {patch} "
            f"(e.g. {patch * 2}, {patch * 4}, {patch * 8}, 224)"
        )
    return hw


def vit_timm_kwargs(name: str, *, kernel_size, dw_norm, stem_stride, drop_path_rate, depths, dims,
                    layer_scale_init, img_size, in_chans, dynamic_img_size, head_dim: int) -> tuple[dict, int, tuple]:
    """Validated timm ``VisionTransformer`` kwargs of a ViT factory: ``(kwargs, patch, (H, W))``.
    ``stem_stride`` s: patch 4 s; ``dims`` width (heads = width / ``head_dim``, at least 1)."""
    s = _check_common(name, stem_stride, drop_path_rate, in_chans)
    _no_depthwise(name, kernel_size, dw_norm)
    patch = 4 * s
    hw = _check_img_size(name, img_size, patch)
    kw: dict = dict(
        img_size=hw,
        patch_size=patch,
        drop_path_rate=float(drop_path_rate),
        in_chans=int(in_chans),
        dynamic_img_size=bool(dynamic_img_size),
    )
    if depths is not None:
        kw["depth"] = _one_int(name, "depths", depths)
    if dims is not None:
        width = _one_int(name, "dims", dims)
        heads = max(1, width // head_dim)
        if width % heads:
            raise ValueError(f"{name}: dims {width} must be divisible by its {heads} heads (width / {head_dim})")
        kw["embed_dim"], kw["num_heads"] = width, heads
    if not _unset(layer_scale_init, BCSSL_DEFAULT_LAYER_SCALE):
        kw["init_values"] = float(layer_scale_init)
    return kw, patch, hw


def vit_backbone(model: nn.Module, name: str, patch: int, hw: tuple, dynamic_img_size: bool) -> ViTBackbone:
    """A timm ViT behind the contract (one stage map, reduction = the patch)."""
    backbone = ViTBackbone(
        model, name=name, min_input_size=patch, reductions=(patch,), multiple_of=patch,
        fixed_size=None if dynamic_img_size else hw,
    )
    backbone.patch_size = patch
    backbone.img_size = hw
    return backbone


@register_backbone("vit_s16")
def vit_s16(
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
) -> TimmBackbone:
    """ViT-S/16 (timm ``vit_small_patch16_224``, = DINO's ``vits.vit_small``): 12 blocks, width 384,
    6 heads, learned position embedding, cls-token pooling. (MoCo v3's ViT-S/16 is another model:
    ``vit_s16_mocov3``.)

    ``img_size``: the position-embedding grid (multiple of the patch). ``dynamic_img_size``: accept
    any multiple of the patch by interpolating the position embedding (default; needed for
    multi-crop). ``stem_stride`` s: patch 4 s. ``depths``/``dims``: one int each (depth, width;
    heads = width / 64, at least 1). ``layer_scale_init`` other than the BC-SSL default 1e-6 / None
    enables timm's layer scale.
    """
    name = "vit_s16"
    kw, patch, hw = vit_timm_kwargs(
        name, kernel_size=kernel_size, dw_norm=dw_norm, stem_stride=stem_stride, drop_path_rate=drop_path_rate,
        depths=depths, dims=dims, layer_scale_init=layer_scale_init, img_size=img_size, in_chans=in_chans,
        dynamic_img_size=dynamic_img_size, head_dim=64)
    return vit_backbone(_create_timm("vit_small_patch16_224", **kw), name, patch, hw, dynamic_img_size)


@register_backbone("swin_t")
def swin_t(
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
    window_size: int = 7,
) -> TimmBackbone:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``): patch 4, window 7, depths 2,2,6,2,
    widths 96..768, heads 3,6,12,24.

    ``img_size``: any multiple of the patch size (see the module docstring). ``dims``: 4 widths,
    each twice the previous (timm's Swin doubles per stage); heads = width / 32 (at least 1).
    ``stem_stride`` s: patch s. ``drop_path_rate`` defaults to 0 here (timm's default is 0.1).
    """
    name = "swin_t"
    s = _check_common(name, stem_stride, drop_path_rate, in_chans)
    _no_depthwise(name, kernel_size, dw_norm)
    if not _unset(layer_scale_init, BCSSL_DEFAULT_LAYER_SCALE):
        _reject(name, "layer_scale_init", layer_scale_init, "Swin has no layer scale")
    if not _is_int(window_size) or window_size < 1:
        raise ValueError(f"{name}: window_size must be a positive int, got {window_size!r}")
    patch = s
    hw = _check_img_size(name, img_size, patch)
    kw: dict = dict(
        img_size=hw,
        patch_size=patch,
        window_size=int(window_size),
        drop_path_rate=float(drop_path_rate),
        in_chans=int(in_chans),
        dynamic_img_size=bool(dynamic_img_size),
    )
    if depths is not None:
        kw["depths"] = _four_ints(name, "depths", depths)
    if dims is not None:
        dims = _four_ints(name, "dims", dims)
        if any(dims[i + 1] != 2 * dims[i] for i in range(3)):
            raise ValueError(f"{name}: dims must double per stage (d, 2d, 4d, 8d), got {dims}")
        heads = tuple(max(1, d // 32) for d in dims)
        if any(d % h for d, h in zip(dims, heads)):
            raise ValueError(f"{name}: dims {dims} must be divisible by their heads {heads} (width / 32)")
        kw["embed_dim"], kw["num_heads"] = dims[0], heads
    model = _create_timm("swin_tiny_patch4_window7_224", **kw)
    backbone = SwinBackbone(
        model, name=name, min_input_size=patch, reductions=tuple(patch * 2 ** i for i in range(4)),
        multiple_of=patch, fixed_size=None if dynamic_img_size else hw,
    )
    backbone.patch_size = patch
    backbone.img_size = hw
    return backbone
