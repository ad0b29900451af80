"""The backbone contract: what every registered backbone gives the methods and the evaluations.

A backbone is an ``nn.Module`` subclassing :class:`Backbone`. The methods (CARE's stage-3 map,
MoCo v3's random patch projection), detection, export, throughput and CAM use these members and
nothing else, so a new backbone family is one file (a :class:`Backbone` subclass and a factory)
plus one ``@register_backbone`` line; ``tests/models/test_contract.py`` registers a tiny family
and runs CARE, detection, export and CAM on it.

Required (abstract here):

- ``num_features`` (int): width of the pooled features.
- ``feature_info`` (list of :class:`StageInfo`): one entry per stage map that
  :meth:`Backbone.forward_intermediates` returns, with its channels and its reduction (stride with
  respect to the input), as timm's ``feature_info``.
- ``forward_intermediates(x) -> (final, [stage maps (B, C_i, H_i, W_i)])``: every stage's map
  in one pass, and the final features ``forward_head`` pools (timm's ``forward_intermediates``:
  the last map of a CNN, the tokens of a ViT).
- ``forward_head(final) -> (B, num_features)``: pooled features from ``final``.
- ``cam_target_layer`` (nn.Module): the layer Grad-CAM / Eigen-CAM hook.

With defaults:

- ``forward(x) -> (B, num_features)``: pooled features (what k-NN, the linear probe and every
  method's projector read); default ``forward_head(forward_intermediates(x)[0])``.
- ``forward_features(x)``: the last stage map, ``(B, C, H', W')``.
- ``linear_features(x)``: what the linear probe reads; default the pooled features.
- ``cam_reshape``: ``None`` when the CAM layer's output is already ``(B, C, h, w)``, else a
  callable (pytorch-grad-cam's ``reshape_transform``).
- ``patch_projection``: the patch-embedding projection of a transformer (``None`` for CNNs);
  MoCo v3 freezes it (``method.moco_v3.stop_grad_conv1``).
- ``fold_bn()``: an eval-mode copy with every BatchNorm that can be folded into the preceding
  conv folded (BC-SSL's BN after the depthwise conv); ``has_foldable_bn`` says whether there is one.
- ``set_drop_path(rate)``: stochastic depth rising linearly from 0 to ``rate`` over the blocks
  (detection fine-tuning); the default sets every module with a ``drop_prob`` attribute.
- ``min_input_size``, ``in_chans``, ``kernel_sizes`` (depthwise kernels, ``None`` if none).
- ``architecture()``: ``(name, kwargs)`` that rebuilds this exact model for a safetensors export,
  or ``None`` (then the exporter uses the run's ``model.*``).
- ``timm_convnext()``: the model as timm's ConvNeXt (:class:`TimmConvNeXtLayout`) for
  ``bcssl export --format timm``, or ``None`` when it is none; ``ValueError`` when it is a ConvNeXt
  timm cannot express.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    """One stage map of :meth:`Backbone.forward_intermediates`: channels, reduction (its stride
    with respect to the input, e.g. 4, 8, 16, 32) and the name of the module that produces it."""

    channels: int
    reduction: int
    module: str = ""


@dataclass(frozen=True)
class TimmConvNeXtLayout:
    """A backbone expressed as timm's ConvNeXt: its shape and its state dict in timm's key names
    (MLP weights as ``nn.Linear``; the exporter reshapes them for timm's 1x1-conv MLPs)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    stem_stride: int
    in_chans: int
    state_dict: dict


class Backbone(nn.Module):
    """Base class of every bcssl backbone (see the module docstring for the contract)."""

    num_features: int
    in_chans: int = 3
    cam_reshape: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    kernel_sizes: Optional[tuple[int, ...]] = None

    # -- required ---------------------------------------------------------------------------------
    @property
    def feature_info(self) -> list[StageInfo]:
        raise NotImplementedError(f"{type(self).__name__} must define feature_info")

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must define forward_intermediates")

    def forward_head(self, final: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward_head")

    @property
    def cam_target_layer(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define cam_target_layer")

    # -- defaults ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.forward_head(self.forward_intermediates(x)[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map ``(B, C, H', W')`` before pooling."""
        return self.forward_intermediates(x)[1][-1]

    #: a name for what :meth:`linear_features` returns (written next to linear-probe results)
    linear_features_kind = "pooled"

    def linear_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the linear probe reads: the pooled features unless a model says otherwise."""
        return self(x)

    @property
    def patch_projection(self) -> Optional[nn.Module]:
        """The patch-embedding projection of a transformer; ``None`` for CNNs."""
        return None

    @property
    def min_input_size(self) -> int:
        """Smallest input side the model takes."""
        return 1

    @property
    def has_foldable_bn(self) -> bool:
        """Whether :meth:`fold_bn` folds anything (a BatchNorm right after a conv)."""
        return False

    def fold_bn(self) -> nn.Module:
        """Eval-mode copy with the foldable BatchNorms folded; a plain copy when there are none."""
        return copy.deepcopy(self).eval()

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (ConvNeXt's rule)."""
        paths = [m for m in self.modules() if isinstance(getattr(m, "drop_prob", None), float)]
        for i, m in enumerate(paths):
            m.drop_prob = rate * i / (len(paths) - 1) if len(paths) > 1 else 0.0

    def architecture(self) -> Optional[tuple[str, dict]]:
        """``(name, kwargs)`` rebuilding this model for an export, or ``None`` (use the run's config)."""
        return None

    def timm_convnext(self) -> Optional[TimmConvNeXtLayout]:
        """This model as timm's ConvNeXt, or ``None`` when it is no ConvNeXt."""
        return None


def check_backbone(model: nn.Module, name: str) -> Backbone:
    """``model`` if it implements the contract, else a ``TypeError`` naming the factory."""
    if not isinstance(model, Backbone):
        raise TypeError(f"backbone factory {name!r} returned a {type(model).__name__}, not a "
                        "bcssl.models.Backbone (see bcssl/models/contract.py)")
    return model
