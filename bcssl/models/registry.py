"""Backbone registry: ``register_backbone``, ``create_backbone``, ``list_backbones``.

Every backbone factory takes keyword arguments only and returns an ``nn.Module`` that satisfies
the backbone contract (``num_features``, ``forward``, ``forward_features``, ``cam_target_layer``,
``cam_reshape``); see ``bcssl/models/bcssl_convnext.py`` for the reference implementation.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict

import torch.nn as nn

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

    Raises ``ValueError`` for an unknown name, naming the closest valid one and listing all.
    """
    fn = _REGISTRY.get(name)
    if fn is None:
        valid = list_backbones()
        # compare lower-cased so "BCSSL_S" suggests "bcssl_s"
        lower = {n.lower(): n for n in valid}
        closest = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.0)
        hint = f" (did you mean {lower[closest[0]]!r}?)" if closest else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; valid backbones: {', '.join(valid)}")
    return fn(**kwargs)
