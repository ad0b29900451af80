"""Mixed precision in one place: the modes a config may name and the autocast context that the
training, fine-tuning and evaluation loops enter."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from bcssl.config.schema import AMP_MODES  # the config validates with the same tuple

if TYPE_CHECKING:
    import torch


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 or float16 on ``device``'s type; a no-op context for ``none``."""
    import torch  # here, not at the top: importing this module stays light

    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


__all__ = ["AMP_MODES", "autocast"]
