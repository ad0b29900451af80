"""Self-supervised methods. ``create_method(name, model_cfg, method_cfg)`` is the one entry point;
a new method is one new file plus one line in ``_METHODS``."""
from __future__ import annotations

import difflib

from bcssl.methods.base import SSLMethod
from bcssl.methods.byol import BYOL
from bcssl.methods.care import CARE
from bcssl.methods.dino import DINO, DINOLoss
from bcssl.methods.moco_v3 import MoCoV3

_METHODS = {"dino": DINO, "byol": BYOL, "moco_v3": MoCoV3, "care": CARE}


def create_method(name: str, model_cfg, method_cfg) -> SSLMethod:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method '{name}'.{hint} Available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](model_cfg, method_cfg)


__all__ = ["BYOL", "CARE", "DINO", "DINOLoss", "MoCoV3", "SSLMethod", "create_method"]
