"""Inference throughput (the paper's Table 3; docs/recipe.md section 5): images/s, forward only, after warm-up.

The paper measures at 224 px, batch 64/128, AMP, on one GPU (A100: BC-SSL-T 1777 vs Swin-T 1326
img/s, +34%). BC-SSL models are measured with the BatchNorm after each depthwise conv folded into
that conv (``fold_bn``), which is how they are deployed: the BN then costs nothing.

``benchmark`` builds every model first, then measures them interleaved -- round 1: A, B, C;
round 2: A, B, C; ... -- and reports each model's median over the rounds, so that machine noise
(other jobs, clock changes) hits every model alike instead of whichever ran during it.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from bcssl.engine.amp import AMP_MODES
from bcssl.engine.amp import autocast as amp_autocast
from bcssl.eval.registry import Evaluation
from bcssl.models import count_macs, count_params, create_backbone, list_backbones
from bcssl.models.baselines import IMG_SIZE_BASELINES, KERNEL_SIZE_BASELINES

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_args(resolution, batch_size, amp, warmup, iters) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")


def measure_throughput(
    model: nn.Module,
    *,
    resolution: int = 224,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
    amp: str = "none",
    channels_last: bool = False,
    warmup: int = 3,
    iters: int = 10,
) -> float:
    """Images per second of ``model`` on random ``(batch_size, C, resolution, resolution)`` input.

    Forward only, eval mode, ``torch.inference_mode``, ``warmup`` untimed batches first; on CUDA
    the device is synchronised before and after the timed ``iters`` batches (and cuDNN autotuning
    is on while measuring). ``amp``: ``'none'``, ``'bf16'`` or ``'fp16'`` autocast.
    The model is moved to ``device`` (and to channels-last memory format if asked) in place;
    its train/eval flags are restored afterwards.
    """
    _check_args(resolution, batch_size, amp, warmup, iters)
    device = torch.device(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    in_chans = int(model.in_chans)
    x = torch.randn(batch_size, in_chans, resolution, resolution, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        with torch.inference_mode(), amp_autocast(amp, device):
            for _ in range(warmup):
                model(x)
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                model(x)
            _sync(device)
            elapsed = time.perf_counter() - start
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for m, training in modes:
            m.training = training
    return batch_size * iters / max(elapsed, 1e-12)


def _check_names(names: Sequence[str]) -> None:
    valid = set(list_backbones())
    for name in names:
        if name not in valid:
            create_backbone(name)  # raises ValueError naming the closest and listing every valid name
            raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(valid))}")


def _build(name: str, resolution: int, kernel_size) -> nn.Module:
    kw: dict = {}
    if kernel_size is not None and (name.startswith("bcssl_") or name in KERNEL_SIZE_BASELINES):
        kw["kernel_size"] = kernel_size
    if name in IMG_SIZE_BASELINES:
        # Fixed-size Swin precomputes its shifted-window masks, as the paper's Swin-T did.
        kw.update(img_size=resolution, dynamic_img_size=False)
    return create_backbone(name, **kw).eval()


def benchmark(
    names: Union[str, Iterable[str]],
    *,
    resolution: int = 224,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
    amp: str = "none",
    channels_last: bool = False,
    fold_bn: bool = True,
    compare_unfolded: bool = False,
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 3,
    kernel_size=None,
    progress: bool = False,
) -> list[dict]:
    """Throughput table of the backbones ``names`` (Table 3 style): one row per measured model.

    Row keys: ``model``, ``kernel_size`` (the model's depthwise kernels or ``None``),
    ``params_m`` (millions, with a 1000-way classifier, as the paper counts), ``gmacs`` (at
    ``resolution``, with the classifier), ``img_per_s`` (median over ``repeats`` interleaved
    rounds), ``img_per_s_runs`` (every round), ``fold_bn`` (``True``/``False`` for models with a
    BN after the depthwise conv, ``None`` where there is none), ``amp``, ``channels_last``,
    ``device``, ``resolution``, ``batch_size``.

    ``fold_bn=True`` measures BC-SSL models with the BN folded into the depthwise conv (the
    deployed form); ``compare_unfolded=True`` adds a row measuring the unfolded model too.
    ``kernel_size`` is passed to the models that have depthwise kernels (``bcssl_*``,
    ``convnext_t``). ViT/Swin are built for exactly ``resolution``.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("benchmark needs at least one backbone name")
    _check_names(names)
    _check_args(resolution, batch_size, amp, warmup, iters)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")

    models = [(name, _build(name, resolution, kernel_size)) for name in names]
    return _measure(models, resolution=resolution, batch_size=batch_size, device=device, amp=amp,
                    channels_last=channels_last, fold_bn=fold_bn, compare_unfolded=compare_unfolded, warmup=warmup,
                    iters=iters, repeats=repeats, progress=progress)


def _measure(models: Sequence[tuple[str, nn.Module]], *, resolution: int, batch_size: int, device, amp: str,
             channels_last: bool, fold_bn: bool, compare_unfolded: bool, warmup: int, iters: int, repeats: int,
             progress: bool) -> list[dict]:
    """:func:`benchmark`'s rows for built ``(name, model)`` pairs."""
    device = torch.device(device)
    entries: list[dict] = []
    for name, model in models:
        ks = getattr(model, "kernel_sizes", None)
        row = dict(
            model=name,
            kernel_size=(ks[0] if ks and len(set(ks)) == 1 else (list(ks) if ks else None)),
            params_m=round(count_params(model, num_classes=1000) / 1e6, 2),
            gmacs=round(count_macs(model, resolution, num_classes=1000) / 1e9, 2),
        )
        variants: list[tuple[Optional[bool], nn.Module]]
        if model.has_foldable_bn:
            variants = [(True, model.fold_bn())] if fold_bn else []
            if compare_unfolded or not fold_bn:
                variants.append((False, model))
        else:
            variants = [(None, model)]
        for folded, m in variants:
            entries.append(dict(row, fold_bn=folded, _model=m, _runs=[]))

    total = len(entries) * repeats
    with tqdm(total=total, desc="throughput", disable=not progress, leave=False) as bar:
        for r in range(repeats):
            for e in entries:
                bar.set_postfix_str(e["model"])
                e["_runs"].append(
                    measure_throughput(
                        e["_model"], resolution=resolution, batch_size=batch_size, device=device,
                        amp=amp, channels_last=channels_last,
                        warmup=warmup if r == 0 else min(warmup, 1), iters=iters,
                    )
                )
                bar.update(1)

    rows = []
    for e in entries:
        runs = e.pop("_runs")
        e.pop("_model")
        rows.append(dict(
            e,
            img_per_s=round(statistics.median(runs), 1),
            img_per_s_runs=[round(v, 1) for v in runs],
            amp=amp,
            channels_last=bool(channels_last),
            device=str(device),
            resolution=resolution,
            batch_size=batch_size,
        ))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``benchmark`` rows; ``vs first`` is the speed relative to the first row
    (the paper's "+34%")."""
    header = ["model", "kernel", "params (M)", "GMACs", "img/s", "vs first", "BN folded", "AMP",
              "channels_last", "device", "res", "batch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    base = rows[0]["img_per_s"] if rows else None
    for row in rows:
        rel = "-" if not base else f"{(row['img_per_s'] / base - 1) * 100:+.0f}%"
        folded = {True: "yes", False: "no", None: "-"}[row.get("fold_bn")]
        ks = row.get("kernel_size")
        cells = [
            str(row["model"]),
            "-" if ks is None else str(ks),
            f"{row['params_m']:.1f}",
            f"{row['gmacs']:.2f}",
            f"{row['img_per_s']:.1f}",
            rel,
            folded,
            str(row.get("amp", "-")),
            "yes" if row.get("channels_last") else "no",
            str(row.get("device", "-")),
            str(row.get("resolution", "-")),
            str(row.get("batch_size", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Throughput(Evaluation):
    """The paper's Table 3 columns for a run's architecture (its config's model, BN folded as
    deployed): per model, not per checkpoint; ``bcssl bench throughput --models`` compares models
    by name without a run."""
    name = "throughput"
    section = "throughput"
    per_model = True

    def run(self, run_dir, overrides=(), *, progress: bool = True, **options) -> dict:
        from pathlib import Path

        from bcssl.engine.run_dir import write_json
        from bcssl.engine.runtime import load_run, resolve_device

        loaded = load_run(run_dir, overrides)
        cfg, tc = loaded.cfg, loaded.cfg.throughput
        rows = _measure([(str(cfg.model.name), loaded.backbone.eval())], resolution=tc.resolution,
                        batch_size=tc.batch_size, device=resolve_device(cfg.device), amp=tc.amp,
                        channels_last=tc.channels_last, fold_bn=True, compare_unfolded=tc.compare_unfolded,
                        warmup=tc.warmup, iters=tc.iters, repeats=tc.repeats, progress=progress)
        result = {"run_dir": str(run_dir), "rows": rows}
        write_json(Path(run_dir) / "throughput.json", result)
        return result

    def summary(self, result: dict, run_dir) -> str:
        return format_table(result["rows"])

    def report_section(self, runs, out_dir, fig_dir):
        from bcssl.eval.report import _throughput_section

        return _throughput_section(runs)


EVALUATION = Throughput()
