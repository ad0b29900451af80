"""Backbones: the backbone contract, registry, the BC-SSL ConvNeXt, the baselines, BN folding and
complexity counters."""

from .contract import Backbone, StageInfo, TimmConvNeXtLayout
from .registry import create_backbone, list_backbones, register_backbone
from .bcssl_convnext import BCSSLConvNeXt, fold_bn  # importing registers bcssl_atto..bcssl_s
from . import baselines  # noqa: F401  registers resnet50, convnext_t, vit_s16, swin_t (timm)
from . import vit_mocov3  # noqa: F401  registers vit_s16_mocov3 (MoCo v3's ViT-S/16)
from .complexity import count_macs, count_params

__all__ = [
    "Backbone",
    "StageInfo",
    "TimmConvNeXtLayout",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "fold_bn",
    "BCSSLConvNeXt",
    "count_macs",
    "count_params",
]
