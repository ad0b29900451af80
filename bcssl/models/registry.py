"""Backbone registry: ``register_backbone``, ``create_backbone``, ``list_backbones``.

Every backbone factory takes keyword arguments only and returns a
:class:`bcssl.models.contract.Backbone` (the written backbone contract: pooled features, stage
maps with their strides and channels, CAM layer, patch projection, BN folding, export layout);
``create_backbone`` refuses anything else. A new family is one file with a ``Backbone`` subclass
and a ``@register_backbone("name")`` factory, imported from ``bcssl/models/__init__.py``.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict

import torch.nn as nn

from .contract import check_backbone

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: Dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``fn(**kw) -> nn.Module`` under ``name``.

    Registering a second, different factory under a taken name is a ``ValueError``; the same
    function re-registered (module reload) replaces the old entry.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")

    def decorator(fn: BackboneFactory) -> BackboneFactory:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"backbone {name!r} is already registered by {old.__module__}.{old.__qualname__}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Sorted names of all registered backbones."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` with ``kwargs``.

    Raises ``ValueError`` for an unknown name, naming the closest valid one and listing all, and
    ``TypeError`` when the factory returns something that is not a ``Backbone``.
    """
    fn = _REGISTRY.get(name)
    if fn is None:
        valid = list_backbones()
        # compare lower-cased so "BCSSL_S" suggests "bcssl_s"
        lower = {n.lower(): n for n in valid}
        closest = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.0)
        hint = f" (did you mean {lower[closest[0]]!r}?)" if closest else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; valid backbones: {', '.join(valid)}")
    return check_backbone(fn(**kwargs), name)
