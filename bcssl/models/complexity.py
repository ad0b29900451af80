"""Model complexity: parameter and multiply-accumulate (MAC) counts.

Papers (BC-SSL, ConvNeXt, Swin) report params and "FLOPs" (really MACs) of the backbone plus a
1000-way linear classifier; pass ``num_classes=1000`` to count that classifier too.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

InputSize = Union[int, Sequence[int]]


def count_params(model: nn.Module, trainable_only: bool = False, num_classes: int = 0) -> int:
    """Number of parameters of ``model`` (shared tensors counted once).

    ``num_classes > 0`` adds a linear classifier on ``model.num_features``
    (``num_features * num_classes + num_classes`` parameters).
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    if num_classes:
        total += (model.num_features + 1) * num_classes
    return total


def _input_shape(model: nn.Module, input_size: InputSize) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 2:
        return (int(getattr(model, "in_chans", 3)), *input_size)
    if len(input_size) == 3:
        return input_size  # type: ignore[return-value]
    raise ValueError(f"input_size must be S, (H, W) or (C, H, W), got {input_size}")


@torch.no_grad()
def count_macs(model: nn.Module, input_size: InputSize = 224, num_classes: int = 0) -> int:
    """MACs of one forward pass of a single image (batch 1) in eval mode.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; it
    reports FLOPs = 2 x MACs, so the total is halved; norms/activations are not counted, as in
    the papers). ``input_size`` is S, (H, W) or (C, H, W); C defaults to ``model.in_chans`` or 3.
    ``num_classes > 0`` adds a linear classifier on ``model.num_features``
    (``num_features * num_classes`` MACs; bias adds are not counted, as for every layer).
    The model's train/eval flags are restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *_input_shape(model, input_size)), device=device, dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # BN with batch statistics on a batch of 1 could fail or differ
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes:
            m.training = training
    macs = counter.get_total_flops() // 2
    if num_classes:
        macs += model.num_features * num_classes
    return int(macs)
