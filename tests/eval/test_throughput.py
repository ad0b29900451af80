"""Throughput: measurement, BN folding in the benchmark, interleaved repeats, the table, errors."""

import pytest
import torch
import torch.nn as nn

from bcssl.eval import throughput
from bcssl.eval.throughput import benchmark, format_table, measure_throughput
from bcssl.models import create_backbone, fold_bn, list_backbones

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def test_measure_throughput_positive_and_restores_mode():
    m = create_backbone("bcssl_atto", **TINY).train()
    ips = measure_throughput(m, resolution=32, batch_size=2, warmup=1, iters=2)
    assert isinstance(ips, float) and ips > 0
    assert m.training and all(mod.training for mod in m.modules())


def test_measure_throughput_amp_and_channels_last():
    m = create_backbone("bcssl_atto", **TINY)
    assert measure_throughput(m, resolution=32, batch_size=2, amp="bf16", channels_last=True,
                              warmup=0, iters=1) > 0


def test_measure_throughput_is_forward_only_in_eval_mode():
    seen = []

    class Probe(nn.Module):
        in_chans = 3

        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape)))
            return x.mean()

    measure_throughput(Probe(), resolution=8, batch_size=3, warmup=2, iters=4)
    assert seen == [(False, True, (3, 3, 8, 8))] * 6


@pytest.mark.parametrize(
    "kw,match",
    [(dict(amp="fp8"), "amp must be one of"), (dict(iters=0), "iters"), (dict(batch_size=0), "batch_size"),
     (dict(resolution=0), "resolution")],
)
def test_measure_throughput_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        measure_throughput(nn.Identity(), **kw)


def test_folded_and_unfolded_give_the_same_outputs():
    m = create_backbone("bcssl_atto", **TINY).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BN statistics far from identity, so folding really changes the convs
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.3)
                mod.weight.copy_(torch.randn(mod.num_features, generator=g) + 1)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g))
    folded = fold_bn(m)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-4, rtol=1e-4)


def test_benchmark_rows_and_table():
    rows = benchmark(["bcssl_atto", "vit_s16"], resolution=32, batch_size=2, warmup=1, iters=1,
                     repeats=2, compare_unfolded=True, kernel_size=3)
    assert [(r["model"], r["fold_bn"]) for r in rows] == [
        ("bcssl_atto", True), ("bcssl_atto", False), ("vit_s16", None)]
    atto, _, vit = rows
    assert atto["kernel_size"] == 3 and vit["kernel_size"] is None  # kernel only where there are DW convs
    assert atto["params_m"] == pytest.approx(3.7, abs=0.1)  # bcssl_atto k3 + 1000-way classifier
    for r in rows:
        assert r["img_per_s"] > 0 and len(r["img_per_s_runs"]) == 2 and r["gmacs"] > 0
        assert (r["amp"], r["channels_last"], r["device"], r["resolution"], r["batch_size"]) == (
            "none", False, "cpu", 32, 2)
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "img/s" in lines[0] and "params (M)" in lines[0] and "GMACs" in lines[0]
    assert lines[2].startswith("| bcssl_atto | 3 |") and "| yes |" in lines[2] and "+0%" in lines[2]
    assert lines[4].startswith("| vit_s16 | - |")


def test_benchmark_interleaves_and_takes_the_median(monkeypatch):
    calls = []
    speeds = {"bcssl_atto": iter([10.0, 30.0, 20.0]), "resnet50": iter([5.0, 1.0, 3.0])}

    def fake(model, **kw):
        name = model.name if hasattr(model, "family") else "bcssl_atto"
        calls.append((name, kw["warmup"]))
        return next(speeds[name])

    monkeypatch.setattr(throughput, "measure_throughput", fake)
    monkeypatch.setattr(throughput, "count_macs", lambda *a, **k: 0)  # skip real forwards
    rows = benchmark(["bcssl_atto", "resnet50"], resolution=32, repeats=3, warmup=2)
    assert [c[0] for c in calls] == ["bcssl_atto", "resnet50"] * 3
    assert [c[1] for c in calls] == [2, 2, 1, 1, 1, 1]  # full warm-up in round one only
    assert [r["img_per_s"] for r in rows] == [20.0, 3.0]
    assert "-85%" in format_table(rows).splitlines()[3]


def test_benchmark_fold_bn_false_measures_unfolded(monkeypatch):
    monkeypatch.setattr(throughput, "count_macs", lambda *a, **k: 0)
    monkeypatch.setattr(throughput, "measure_throughput", lambda model, **kw: (
        1.0 if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else 2.0))
    rows = benchmark("bcssl_atto", resolution=32, fold_bn=False, repeats=1)
    assert [(r["fold_bn"], r["img_per_s"]) for r in rows] == [(False, 1.0)]
    rows = benchmark("bcssl_atto", resolution=32, repeats=1)
    assert [(r["fold_bn"], r["img_per_s"]) for r in rows] == [(True, 2.0)]


def test_benchmark_bad_name_lists_valid_names(monkeypatch):
    built = []
    monkeypatch.setattr(throughput, "_build", lambda *a: built.append(a))
    with pytest.raises(ValueError) as err:
        benchmark(["bcssl_atto", "swin_tt"], resolution=32)
    msg = str(err.value)
    assert "unknown backbone 'swin_tt'" in msg and "did you mean 'swin_t'?" in msg
    assert all(n in msg for n in list_backbones())
    assert built == []  # names are checked before anything is built
    with pytest.raises(ValueError, match="at least one"):
        benchmark([], resolution=32)
