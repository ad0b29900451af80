"""Backbones: registry, the BC-SSL ConvNeXt, BN folding and complexity counters."""

from .registry import create_backbone, list_backbones, register_backbone
from .bcssl_convnext import BCSSLConvNeXt, fold_bn  # importing registers bcssl_atto..bcssl_s
from . import baselines  # noqa: F401  registers resnet50, convnext_t, vit_s16, swin_t (timm)
from .complexity import count_macs, count_params

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "fold_bn",
    "BCSSLConvNeXt",
    "count_macs",
    "count_params",
]
