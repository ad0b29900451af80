"""BC-SSL ConvNeXt: ConvNeXt with large depthwise kernels and a BatchNorm after each depthwise conv.

Paper: "The Counterattack of CNNs in Self-Supervised Learning: Larger Kernel Size might be All You
Need". The two changes to ConvNeXt live in ``BCSSLBlock``:

1. every depthwise conv is followed by ``bn_dw`` (BatchNorm2d), kept before ConvNeXt's own
   LayerNorm (``dw_norm='bn+ln'``, paper default), or replacing it (``'bn'``), or absent (``'ln'``,
   vanilla ConvNeXt);
2. the depthwise kernel is 9x9 by default (any odd size 3..31, or one size per stage).

Parameter names follow timm's ConvNeXt (``stem.0``, ``stages.{i}.blocks.{j}.conv_dw``, ``head.norm``
...), so ``fold_bn(model).state_dict()`` of a ``'bn+ln'`` model loads strictly into
``timm.create_model('convnext_tiny', kernel_sizes=9, num_classes=0)`` (for atto..nano, which timm
builds with 1x1-conv MLPs, pass ``conv_mlp=False`` too).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import Backbone, StageInfo, TimmConvNeXtLayout
from .registry import register_backbone

DW_NORMS = ("bn+ln", "ln", "bn")
STEM_STRIDES = (4, 2, 1)
KernelSize = Union[int, Sequence[int]]

# (depths, dims) of timm's ConvNeXt sizes.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "bcssl_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "bcssl_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "bcssl_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "bcssl_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "bcssl_t": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "bcssl_s": ((3, 3, 27, 3), (96, 192, 384, 768)),
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def _kernel_sizes(kernel_size: KernelSize) -> tuple[int, int, int, int]:
    """Validate ``kernel_size`` and expand it to one odd size per stage."""

    def ok(k) -> bool:
        return _is_int(k) and 3 <= k <= 31 and k % 2 == 1

    if ok(kernel_size):
        return (int(kernel_size),) * 4
    if _is_seq(kernel_size) and len(kernel_size) == 4 and all(ok(k) for k in kernel_size):
        return tuple(int(k) for k in kernel_size)  # type: ignore[return-value]
    raise ValueError(
        "kernel_size must be an odd int in 3..31 or a list of 4 such ints (one per stage), "
        f"got {kernel_size!r}"
    )


def _four_positive_ints(name: str, value) -> tuple[int, ...]:
    if _is_seq(value) and len(value) == 4 and all(_is_int(v) and v > 0 for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name} must be 4 positive ints (one per stage), got {value!r}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero the whole residual branch of a sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep  # rescale so the expectation matches eval mode

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Linear(C, 4C) -> GELU -> Linear(4C, C) on channels-last input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting()


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 'same'-padded depthwise conv, with the kernel cut to the taps that can
    reach a pixel: on an H x W map an output pixel sees inputs at most H - 1 rows and W - 1 columns
    away, so a k x k kernel with k > 2H - 1 (a 9x9 kernel on the 4x4 and 2x2 maps of 32 px crops)
    multiplies padding zeros with its outer taps. Cutting them gives the same output and the same
    gradients (the cut taps' gradient is exactly zero either way) for 81/49 to 81/1 fewer
    multiply-adds. Traced or exported graphs keep the full kernel (their input size may change)."""
    kh, kw = conv.kernel_size
    ph, pw = kh // 2, kw // 2
    rh, rw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
    if (rh, rw) == (ph, pw) or _exporting():
        return conv(x)
    weight = conv.weight[:, :, ph - rh:ph + rh + 1, pw - rw:pw + rw + 1]
    return F.conv2d(x, weight, conv.bias, padding=(rh, rw), groups=conv.groups)


class BCSSLBlock(nn.Module):
    """ConvNeXt block with the BC-SSL changes.

    dwconv(k x k) -> [BatchNorm2d] -> NHWC -> [LayerNorm] -> Linear(C,4C) -> GELU -> Linear(4C,C)
    -> layer scale -> NCHW -> drop path + residual.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 9,
        dw_norm: str = "bn+ln",
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = 1e-6,
    ):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        # BC-SSL change 1: BatchNorm right after the large depthwise conv.
        self.bn_dw = nn.BatchNorm2d(dim) if "bn" in dw_norm.split("+") else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if "ln" in dw_norm.split("+") else nn.Identity()
        self.mlp = Mlp(dim, 4 * dim)
        if layer_scale_init is not None:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn_dw(depthwise_conv(self.conv_dw, x))
        x = x.permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class BCSSLStage(nn.Module):
    """Optional downsampling (LayerNorm2d + 2x2 stride-2 conv) followed by ``depth`` blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int,
        kernel_size: int,
        dw_norm: str,
        drop_path_rates: Sequence[float],
        layer_scale_init: Optional[float],
        downsample: bool,
    ):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                BCSSLBlock(out_dim, kernel_size, dw_norm, drop_path_rates[j], layer_scale_init)
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PoolNormHead(nn.Module):
    """Global average pool -> LayerNorm (timm's ``head.norm``); no classifier."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.mean(dim=(-2, -1)))


class BCSSLConvNeXt(Backbone):
    """BC-SSL ConvNeXt backbone (no classifier), behind the backbone contract (``contract.py``).

    Args:
        depths: blocks per stage (4 ints).
        dims: channels per stage (4 ints); ``num_features = dims[-1]``.
        kernel_size: depthwise kernel, an odd int in 3..31 or 4 of them (one per stage).
        dw_norm: norm after the depthwise conv: ``'bn+ln'`` (paper), ``'ln'`` (vanilla ConvNeXt)
            or ``'bn'`` (BatchNorm replaces the LayerNorm).
        stem_stride: patchify stem kernel = stride, one of 4, 2, 1 (2 and 1 for small images).
        drop_path_rate: stochastic depth rate of the last block; rates rise linearly from 0.
        layer_scale_init: initial layer-scale value, ``None`` disables layer scale.
        in_chans: input channels.

    ``forward(x) -> (B, num_features)`` (pooled, ``head.norm``);
    ``forward_features(x) -> (B, dims[-1], H / (8 * stem_stride), W / (8 * stem_stride))``;
    ``forward_intermediates(x)`` -> the last map and the 4 stage maps, of strides
    ``stem_stride * (1, 2, 4, 8)``.
    """

    cam_reshape = None  # CNN feature maps are already 2-D; nothing to reshape for CAM

    def __init__(
        self,
        depths: Sequence[int] = VARIANTS["bcssl_t"][0],
        dims: Sequence[int] = VARIANTS["bcssl_t"][1],
        kernel_size: KernelSize = 9,
        dw_norm: str = "bn+ln",
        stem_stride: int = 4,
        drop_path_rate: float = 0.0,
        layer_scale_init: Optional[float] = 1e-6,
        in_chans: int = 3,
    ):
        super().__init__()
        depths = _four_positive_ints("depths", depths)
        dims = _four_positive_ints("dims", dims)
        kernel_sizes = _kernel_sizes(kernel_size)
        if dw_norm not in DW_NORMS:
            raise ValueError(f"dw_norm must be one of {', '.join(DW_NORMS)}; got {dw_norm!r}")
        if not _is_int(stem_stride) or stem_stride not in STEM_STRIDES:
            raise ValueError(
                f"stem_stride must be one of {', '.join(map(str, STEM_STRIDES))}; got {stem_stride!r}"
            )
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")

        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        self.dw_norm, self.stem_stride, self.in_chans = dw_norm, int(stem_stride), int(in_chans)
        self.drop_path_rate = float(drop_path_rate)
        self.num_features = dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=stem_stride, stride=stem_stride),
            LayerNorm2d(dims[0], eps=1e-6),
        )
        # Linear in the global block index, as in ConvNeXt (computed in Python: no tensors, so
        # building under torch.device('meta') works).
        n = sum(depths)
        rates = [self.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        stages, start = [], 0
        for i in range(4):
            stages.append(
                BCSSLStage(
                    dims[i - 1] if i > 0 else dims[0],
                    dims[i],
                    depths[i],
                    kernel_sizes[i],
                    dw_norm,
                    rates[start : start + depths[i]],
                    layer_scale_init,
                    downsample=i > 0,
                )
            )
            start += depths[i]
        self.stages = nn.Sequential(*stages)
        self.head = PoolNormHead(dims[-1])
        self.apply(_init_weights)

    @property
    def min_input_size(self) -> int:
        """Smallest input side: the stem plus 3 stride-2 downsamplings must leave >= 1 pixel."""
        return 8 * self.stem_stride

    @property
    def cam_target_layer(self) -> nn.Module:
        """Module Grad-CAM hooks: the last block of the last stage."""
        return self.stages[-1].blocks[-1]

    @property
    def feature_info(self) -> list[StageInfo]:
        return [StageInfo(self.dims[i], self.stem_stride * 2 ** i, f"stages.{i}") for i in range(4)]

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2], x.shape[-1]
        m = self.min_input_size
        if h < m or w < m:
            raise ValueError(
                f"input {h}x{w} is too small for stem_stride={self.stem_stride}: "
                f"need at least {m}x{m}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map ``(B, C, H', W')`` before pooling."""
        self._check_size(x)
        return self.stages(self.stem(x))

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(last stage map, [the 4 stage maps])`` in one pass."""
        self._check_size(x)
        maps, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return h, maps

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a feature map and apply ``head.norm`` -> ``(B, num_features)``."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features ``(B, num_features)``."""
        return self.head(self.forward_features(x))

    @property
    def has_foldable_bn(self) -> bool:
        return any(isinstance(getattr(m, "bn_dw", None), nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def fold_bn(self) -> "BCSSLConvNeXt":
        """Eval-mode copy with every ``bn_dw`` folded into its depthwise conv (:func:`fold_bn`)."""
        return fold_bn(self)

    def architecture(self) -> tuple[str, dict]:
        """``("BCSSLConvNeXt", kwargs)``: ``BCSSLConvNeXt(**kwargs)`` rebuilds this architecture
        (no drop path: inference)."""
        block = self.stages[0].blocks[0]
        return "BCSSLConvNeXt", {
            "depths": list(self.depths), "dims": list(self.dims), "kernel_size": list(self.kernel_sizes),
            "dw_norm": self.dw_norm, "stem_stride": self.stem_stride,
            "layer_scale_init": 1e-6 if block.gamma is not None else None, "in_chans": self.in_chans}

    def timm_convnext(self) -> TimmConvNeXtLayout:
        """The BN-folded model as timm's ConvNeXt (same parameter names); ``dw_norm='bn'`` has no
        LayerNorm in its blocks, which timm's ConvNeXt always has: ``ValueError``."""
        if self.dw_norm == "bn":
            raise ValueError("dw_norm='bn' (BatchNorm replaces ConvNeXt's LayerNorm) cannot be expressed as a "
                             "timm ConvNeXt, whose blocks always have a LayerNorm")
        folded = self.fold_bn() if self.has_foldable_bn else self
        return TimmConvNeXtLayout(tuple(self.depths), tuple(self.dims), tuple(self.kernel_sizes),
                                  self.stem_stride, self.in_chans, folded.state_dict())


def _init_weights(module: nn.Module) -> None:
    # timm's ConvNeXt init: trunc-normal(0.02) weights, zero biases for convs and linears.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Eval-mode copy of ``model`` with every ``bn_dw`` folded into its ``conv_dw``.

    BN(conv(x)) = conv'(x) with w' = w * g / sqrt(var + eps) and
    b' = (b - mean) * g / sqrt(var + eps) + beta; ``bn_dw`` becomes ``nn.Identity``. The original
    model is untouched. Models without ``bn_dw`` BatchNorms (``dw_norm='ln'``) are just copied.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        bn = getattr(module, "bn_dw", None)
        conv = getattr(module, "conv_dw", None)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(conv, nn.Conv2d):
            continue
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("fold_bn needs BatchNorm running statistics (track_running_stats=True)")
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype))
        module.bn_dw = nn.Identity()
    if isinstance(folded, BCSSLConvNeXt):
        folded.bn_folded = True
    return folded


def _create(name: str, kwargs: dict) -> BCSSLConvNeXt:
    depths, dims = VARIANTS[name]
    kwargs.setdefault("depths", depths)
    kwargs.setdefault("dims", dims)
    return BCSSLConvNeXt(**kwargs)


@register_backbone("bcssl_atto")
def bcssl_atto(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL atto: depths (2,2,6,2), dims (40,80,160,320)."""
    return _create("bcssl_atto", kwargs)


@register_backbone("bcssl_femto")
def bcssl_femto(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL femto: depths (2,2,6,2), dims (48,96,192,384)."""
    return _create("bcssl_femto", kwargs)


@register_backbone("bcssl_pico")
def bcssl_pico(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL pico: depths (2,2,6,2), dims (64,128,256,512)."""
    return _create("bcssl_pico", kwargs)


@register_backbone("bcssl_nano")
def bcssl_nano(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL nano: depths (2,2,8,2), dims (80,160,320,640)."""
    return _create("bcssl_nano", kwargs)


@register_backbone("bcssl_t")
def bcssl_t(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL-T (paper): depths (3,3,9,3), dims (96,192,384,768)."""
    return _create("bcssl_t", kwargs)


@register_backbone("bcssl_s")
def bcssl_s(**kwargs) -> BCSSLConvNeXt:
    """BC-SSL-S (paper): depths (3,3,27,3), dims (96,192,384,768)."""
    return _create("bcssl_s", kwargs)
