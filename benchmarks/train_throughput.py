"""DINO training images/s, three ways, in one process (machines here are noisy: read the ratios).

  (a) bcssl end to end: uint8 batches -> batched multi-crop on the device -> DINO step
      (image folders: crops cut from the original images in the loader's data.workers, the
      photometric part batched on the device; on the CPU with workers, batched in the workers,
      as the trainer does)
  (b) the model alone on pre-made crops (the compute ceiling of (a))
  (c) the usual reference pipeline: per-image torchvision/PIL multi-crop (DINO's
      DataAugmentationDINO) in DataLoader workers -> the same DINO step, same crops and batch
      (image folders: each file opened with PIL and converted to RGB, as torchvision's ImageFolder)

The three are measured in interleaved rounds and each reports its median.

Goals (issue 3): (a) >= 90% of (b) and (a) >= 1.2x (c) on CPU.

Compute options (issue 4), ``--options``: each row is (b), the model step on the ready crops, with
one change from a plain run (fp32, contiguous memory format, eager, default AdamW), measured in
the same interleaved rounds and reported as a ratio to that plain row:

    channels_last   NHWC activations and weights
    compile         the student's backbone and head torch.compile'd in place (train.compile_backend)
    bf16 / fp16     autocast; fp16 with a GradScaler (CUDA only)
    fused           fused AdamW (one kernel for all parameters)
    full_kernel     BC-SSL's depthwise convs with their whole k x k kernel on every map (the code
                    before the kernel was cut to the taps that reach a pixel of small maps)

Join options with '+' for a combined row (``channels_last+bf16+fused``). ``--only-options``
skips (a)-(c).

    python benchmarks/train_throughput.py                     # demo_fmnist model and crops
    python benchmarks/train_throughput.py --steps 6 --rounds 5 --workers 2 --amp bf16
    python benchmarks/train_throughput.py --only-options --options channels_last,compile,bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pil_multicrop import DataAugmentationDINO  # noqa: E402

from bcssl.config import load_config  # noqa: E402
from bcssl.data import BatchLoader, WorkerPhotometric, pretraining_dataset  # noqa: E402
from bcssl.data.multicrop import multicrop_from_config  # noqa: E402
from bcssl.engine.runtime import build_method, param_groups, step_seed  # noqa: E402
from bcssl.engine.trainer import compile_student  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """The reference: one PIL image at a time through DataAugmentationDINO.

    ``length`` may exceed the number of images (they repeat): the DataLoader must still have
    batches to make while the clock runs. With only as many batches as the measurement consumes,
    its workers finish them all during the untimed warm-up (they prefetch ``2 * workers``
    batches), and (c) would be timed without any of its augmentation.
    """

    def __init__(self, images: torch.Tensor, aug: DataAugmentationDINO, length: int | None = None):
        from PIL import Image

        self.pil = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB") for img in images]
        self.aug = aug
        self.length = length or len(self.pil)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.aug(self.pil[i % len(self.pil)])


class FilePILDataset(torch.utils.data.Dataset):
    """The reference for image files: torchvision ImageFolder's loader (``Image.open(f).convert("RGB")``)
    then DataAugmentationDINO, one file at a time; ``length`` repeats the files as in PILDataset."""

    def __init__(self, paths: list[str], aug: DataAugmentationDINO, length: int | None = None):
        self.paths, self.aug, self.length = list(paths), aug, length or len(paths)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        from PIL import Image

        with open(self.paths[i % len(self.paths)], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.aug(img)


def reference_batches(measured: int, workers: int, prefetch_factor: int = 2) -> int:
    """Batches the reference DataLoader must hold so that its workers still work while the clock
    runs: the ``measured`` (warm-up + timed) steps plus the ``prefetch_factor * workers`` batches
    it keeps queued ahead. The queue is then as full when the clock stops as when it started, so
    the workers make (and compete for the CPU with the model for) one batch per timed step.
    """
    return measured + prefetch_factor * max(workers, 1) + 1


def make_step(method, cfg, memory_format, autocast, fused: bool | None = None, scaler=None):
    opt = torch.optim.AdamW(param_groups(method.student), lr=1e-4, fused=fused)

    def step(crops, i):
        crops = [c.contiguous(memory_format=memory_format) for c in crops]
        with autocast:
            loss, _ = method.loss(crops, i)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        method.after_step(i)
    return step


OPTIONS = ("channels_last", "compile", "bf16", "fp16", "fused", "full_kernel")


def with_full_kernel(step):
    """``step`` with every depthwise conv run on its whole kernel (``full_kernel`` rows)."""
    from unittest import mock

    from bcssl.models import bcssl_convnext

    def run(crops, i):
        with mock.patch.object(bcssl_convnext, "depthwise_conv", lambda conv, x: conv(x)):
            return step(crops, i)
    return run


def parse_options(text: str, device: torch.device) -> tuple[list[tuple[str, set]], list[str]]:
    """'channels_last,bf16+fused' -> rows [(name, {flags})] and notes on rows skipped here."""
    rows, notes = [], []
    for item in filter(None, (t.strip() for t in text.split(","))):
        flags = set(item.split("+"))
        unknown = flags - set(OPTIONS)
        if unknown:
            raise SystemExit(f"unknown --options {sorted(unknown)}; valid: {', '.join(OPTIONS)}")
        if {"bf16", "fp16"} <= flags:
            raise SystemExit(f"--options {item}: bf16 and fp16 exclude each other")
        if "fp16" in flags and device.type != "cuda":
            notes.append(f"{item}: skipped (fp16 autocast with a GradScaler needs CUDA)")
            continue
        rows.append((item, flags))
    return rows, notes


def _sig(x: float) -> float:
    """4 significant digits: a CPU at 224 px can make a few hundredths of an image per second."""
    return float(f"{x:.4g}")


def timed(fn, it, steps: int, batch_size: int, step0: int) -> float:
    t = time.perf_counter()
    for i in range(steps):
        fn(next(it), step0 + i)
    return steps * batch_size / (time.perf_counter() - t)


def interleaved(pipelines: dict, warmup: int, steps: int, rounds: int, batch_size: int) -> dict:
    """Measure the pipelines in turns (a, b, c, a, b, c, ...) and keep each one's median, so load
    from other processes hits all alike. ``pipelines[name] = (step_fn, make_iter)``; each round
    opens a fresh iterator and runs ``warmup`` untimed steps first, so DataLoader workers are
    started before the clock and shut down after it (they never run during another pipeline's turn).
    """
    rates: dict = {name: [] for name in pipelines}
    for r in range(rounds):
        for name, (fn, make_iter) in pipelines.items():
            it = make_iter()
            step0 = r * (warmup + steps)
            for i in range(warmup):
                fn(next(it), step0 + i)
            rates[name].append(timed(fn, it, steps, batch_size, step0 + warmup))
            del it
    return {name: statistics.median(v) for name, v in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_fmnist")
    ap.add_argument("--steps", type=int, default=4, help="steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every measurement")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's train.batch_size")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL reference")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", default=None, choices=["true", "false"])
    ap.add_argument("--options", default="", help=f"compute option rows: comma list of {'/'.join(OPTIONS)} "
                    "(join with + to combine); each is reported as a ratio to a plain fp32 row")
    ap.add_argument("--only-options", action="store_true", help="skip (a)-(c): the plain row and the options only")
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)  # KEY=VALUE overrides may come between the options
    over = list(args.overrides)
    if args.batch:
        over.append(f"train.batch_size={args.batch}")
    if args.amp:
        over.append(f"train.amp={args.amp}")
    if args.channels_last:
        over.append(f"train.channels_last={args.channels_last}")
    cfg = load_config(args.config, over)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    option_rows, notes = parse_options(args.options, device)
    B, n = cfg.train.batch_size, args.warmup + args.steps
    mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16)
                if cfg.train.amp != "none" else torch.autocast(device.type, enabled=False))

    def amp_scaler():  # fp16 trains with a GradScaler, as the trainer does
        return torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None

    data = pretraining_dataset(cfg)
    multicrop = multicrop_from_config(cfg.crops)
    # Image files are cut into crops by data.workers loader workers: like (c)'s, their queue must
    # still be full when the clock stops (reference_batches), so the loader gets that many batches.
    files = hasattr(data, "crop_item")
    limit = B * (reference_batches(n, cfg.data.workers) if files else n)
    # as the trainer: on the CPU with workers, the workers finish the crops too (CropBatch.views)
    in_workers = device.type == "cpu" and cfg.data.workers > 0 and not cfg.data.decode_on_device
    loader = BatchLoader(data, B, seed=0, limit=min(limit, len(data)), workers=cfg.data.workers, crops=multicrop.cfg,
                         decode_device=device, pin_memory=device.type == "cuda",
                         photometric=WorkerPhotometric(multicrop.cfg, partial(step_seed, 0), B) if in_workers else None)

    def crops_of(batch, i):
        if loader.makes_crops:
            batch = batch.to(device)
            return batch.views or multicrop.from_crops(batch.groups, step_seed(0, i), batch.positions, B)
        return multicrop(batch[0].to(device), step_seed(0, i))

    def fresh_method():
        torch.manual_seed(0)
        return build_method(cfg).to(device=device, memory_format=mf).train()

    pipelines = {}
    pre = [crops_of(batch, i) for i, batch in zip(range(n), loader.epoch(0))]
    if not args.only_options:
        # (a) end to end: uint8 batches (or crops cut in the workers) -> multi-crop on the device -> step
        step_a = make_step(fresh_method(), cfg, mf, autocast, scaler=amp_scaler())
        pipelines["a"] = (lambda batch, i: step_a(crops_of(batch, i), i), lambda: loader.epoch(0))
        # (b) model alone: the same crops, made before the clock starts
        pipelines["b"] = (make_step(fresh_method(), cfg, mf, autocast, scaler=amp_scaler()), lambda: iter(pre))
        # (c) reference: PIL multi-crop per image in DataLoader workers
        ref_len = B * reference_batches(n, args.workers)
        aug = DataAugmentationDINO(multicrop.cfg)
        if files:
            ref_data = FilePILDataset([data.path(i) for i in range(loader.num_items)], aug, ref_len)
        else:
            ref_data = PILDataset(torch.cat([x for x, _ in loader.epoch(0)]), aug, ref_len)
        ref = torch.utils.data.DataLoader(ref_data, batch_size=B, num_workers=args.workers, drop_last=True,
                                          persistent_workers=False, pin_memory=device.type == "cuda")
        step_c = make_step(fresh_method(), cfg, mf, autocast, scaler=amp_scaler())
        pipelines["c"] = (lambda crops, i: step_c([x.to(device, non_blocking=True) for x in crops], i),
                          lambda: iter(ref))
    if option_rows or args.only_options:
        # compute options: (b) with one change each from a plain fp32 / contiguous / eager run
        for name, flags in [("plain", set())] + option_rows:
            method = fresh_method()
            fmt = torch.channels_last if "channels_last" in flags else torch.contiguous_format
            method.to(memory_format=fmt)
            if "compile" in flags:
                compile_student(method, cfg.train.get("compile_backend", "inductor"))
            amp = "bf16" if "bf16" in flags else "fp16" if "fp16" in flags else None
            ac = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                  if amp else torch.autocast(device.type, enabled=False))
            scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
            step = make_step(method, cfg, fmt, ac, fused=True if "fused" in flags else None, scaler=scaler)
            if "full_kernel" in flags:
                step = with_full_kernel(step)
            pipelines[f"opt:{name}"] = (step, lambda: iter(pre))
    rates = interleaved(pipelines, args.warmup, args.steps, args.rounds, B)

    result = {"device": str(device), "threads": torch.get_num_threads(), "batch": B, "amp": cfg.train.amp,
              "channels_last": cfg.train.channels_last, "model": cfg.model.name,
              "crops": f"2x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}"}
    print(f"device {device}, {torch.get_num_threads()} threads, batch {B}, crops {result['crops']}, "
          f"amp {cfg.train.amp}, channels_last {cfg.train.channels_last}")
    if not args.only_options:
        a, b, c = rates["a"], rates["b"], rates["c"]
        result.update({"bcssl_end_to_end_img_s": _sig(a), "model_only_img_s": _sig(b),
                       "pil_reference_img_s": _sig(c), "end_to_end_over_model_only": round(a / b, 3),
                       "end_to_end_over_pil_reference": round(a / c, 3)})
        print(f"(a) bcssl end to end      {a:8.4g} img/s")
        print(f"(b) model on ready crops  {b:8.4g} img/s")
        print(f"(c) PIL reference ({args.workers} wk) {c:8.4g} img/s")
        print(f"(a)/(b) = {a / b:.3f}  (goal >= 0.90)    (a)/(c) = {a / c:.3f}  (goal >= 1.2)")
    if "opt:plain" in rates:
        plain = rates["opt:plain"]
        result["options"] = {}
        print("compute options, model on ready crops, ratio to plain (fp32, contiguous, eager, default AdamW):")
        for key, rate in rates.items():
            if key.startswith("opt:"):
                name = key[4:]
                result["options"][name] = {"img_s": round(rate, 1), "over_plain": round(rate / plain, 3)}
                print(f"  {name:28s} {rate:8.1f} img/s  {rate / plain:6.3f}x")
        for note in notes:
            print(f"  {note}")
        result["options_skipped"] = notes
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
