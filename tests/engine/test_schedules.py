"""Schedules against facebookresearch/dino's numpy implementation, at first/middle/last steps."""
import numpy as np
import pytest

from bcssl.engine.schedules import cosine_schedule, teacher_temperature


def dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("base,final,epochs,niter,warmup", [
    (5e-4 * 512 / 256, 1e-6, 100, 7, 10),   # lr: warmup 10 epochs + cosine to 1e-6
    (0.04, 0.4, 100, 7, 0),                 # weight decay: cosine 0.04 -> 0.4
    (0.996, 1.0, 300, 3, 0),                # teacher momentum: cosine 0.996 -> 1
])
def test_cosine_matches_dino(base, final, epochs, niter, warmup):
    ref = dino_cosine_scheduler(base, final, epochs, niter, warmup)
    total = epochs * niter
    for step in (0, warmup * niter // 2, warmup * niter, total // 2, total - 1):
        assert cosine_schedule(step, total, base, final, warmup * niter) == pytest.approx(ref[step], rel=1e-12)
    assert cosine_schedule(0, total, base, final, warmup * niter) == pytest.approx(0.0 if warmup else base)
    assert cosine_schedule(total - 1, total, base, final, warmup * niter) == pytest.approx(final, rel=1e-3, abs=1e-5)


def test_teacher_temperature_matches_dino():
    ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(300 - 30) * 0.07))
    for epoch in (0, 15, 29, 30, 150, 299):
        assert teacher_temperature(epoch, 0.04, 0.07, 30) == pytest.approx(ref[epoch])
