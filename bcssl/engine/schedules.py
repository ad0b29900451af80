"""Training schedules, written as pure functions of the step (or epoch) so that a resumed run
gets exactly the values an uninterrupted run would. They reproduce facebookresearch/dino's
``cosine_scheduler`` and teacher-temperature schedule value for value."""
from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, base: float, final: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps`` (DINO's
    ``np.linspace`` including both ends), then a half cosine from ``base`` towards ``final``
    over the remaining ``total_steps - warmup_steps`` steps (DINO: ``final + 0.5 (base - final)
    (1 + cos(pi i / n))``, so the last step is just above ``final``)."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    n = total_steps - warmup_steps
    i = min(step - warmup_steps, n - 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO: linear from ``warmup_temp`` to ``temp`` over the first ``warmup_epochs`` epochs
    (``np.linspace``, both ends included), then constant."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
