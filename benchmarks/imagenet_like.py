"""Pre-training images/s on an ImageNet-like folder of JPEGs: bcssl's data path against DINO's.

Writes a folder of synthetic JPEGs of ImageNet-like sizes (sides 200-600 px, aspect ratio
log-uniform in [0.6, 1.7], smooth colour fields plus texture, quality 90: ~30-60 KB each), then runs
``benchmarks/train_throughput.py`` on it for each case, which measures in one process, in
interleaved rounds (medians):

  (a) bcssl end to end: crops cut from the original images by PIL in ``--workers`` loader workers
      (DINO's RandomResizedCrop geometry), photometric part batched on the device, DINO step
  (b) the model alone on ready crops (the compute ceiling of (a))
  (c) DINO's per-image PIL pipeline (``DataAugmentationDINO`` on ImageFolder's ``Image.open(f).convert("RGB")``)
      in the same number of workers, then the same DINO step

Cases (``--cases``), both at the paper's crop sizes, 2x224 + 10x96:

  bcssl_t   BC-SSL-T (preset imagenet_bcssl_t_100ep, 65536-dim DINO head), batch ``--batch-t``
  demo      the demo's small BC-SSL (demo_fmnist's widths/depths and head, with the usual stride-4
            stem at 224 px), batch ``--batch-demo``

Goals (issue 12): (a)/(b) >= 0.9 and (a)/(c) >= 1.2 on CPU. Where the model's step dominates the
time (BC-SSL-T on a CPU), all three are close to (b) and the ratios only show that the data path
is not the bottleneck; the demo-sized model shows the data paths' cost.

Then the data paths alone, per image, one thread, interleaved rounds (``--data-rounds``): bcssl's
worker part (decode + crops cut from the original), its photometric part batched on the CPU, and
DINO's whole per-image PIL pipeline. On a GPU the photometric part leaves the CPU, so the ratio
PIL / worker part is how many times fewer CPU cores bcssl's loader needs per image there.

    python benchmarks/imagenet_like.py                              # both cases (~15 min on 2 cores)
    python benchmarks/imagenet_like.py --cases demo --workers 2 --rounds 3
Extra KEY=VALUE overrides apply to every case. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_throughput  # noqa: E402

PAPER_CROPS = ["crops.global_size=224", "crops.local_size=96", "crops.n_local=10"]
CASES = {
    "bcssl_t": ("imagenet_bcssl_t_100ep", []),
    "demo": ("imagenet_bcssl_t_100ep", ["model.name=bcssl_atto", "model.dims=[32,64,128,256]", "model.depths=[1,1,3,1]",
                                        "method.dino.out_dim=2048", "method.dino.hidden_dim=512",
                                        "method.dino.bottleneck_dim=64", "method.dino.use_bn_in_head=true"]),
}


def write_folder(root: Path, n: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """``n`` JPEGs in ``root`` (reused when already there with the same settings)."""
    from PIL import Image

    stamp = root / ".settings"
    settings = f"{n} {min_side} {max_side} {seed}"
    if stamp.is_file() and stamp.read_text() == settings:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))  # width / height
        area = rng.uniform(min_side * max_side * 0.5, max_side ** 2 * 0.6)
        w = int(np.clip(round(math.sqrt(area * aspect)), min_side, max_side))
        h = int(np.clip(round(math.sqrt(area / aspect)), min_side, max_side))
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (h, w, 1), dtype=np.int16)  # texture
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / f"{k:05d}.jpg", quality=90)
    stamp.write_text(settings)
    return root


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_path_costs(folder: Path, rounds: int, n: int = 32) -> dict:
    """Milliseconds per image, one thread, at 2x224 + 10x96, medians of interleaved rounds over ``n``
    images each: bcssl's worker part, its photometric part on the CPU, DINO's PIL pipeline."""
    import statistics
    import time

    import torch

    from bcssl.data import CropBatch, ImageFolderDataset
    from bcssl.data.multicrop import MultiCrop, MultiCropConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = MultiCropConfig(global_size=224, local_size=96, n_local=10)
    ds, mc = ImageFolderDataset(folder), MultiCrop(cfg)
    n = min(n, len(ds))
    pil = train_throughput.FilePILDataset([ds.path(i) for i in range(len(ds))], train_throughput.DataAugmentationDINO(cfg))
    times: dict[str, list[float]] = {"bcssl_workers": [], "bcssl_photometric_cpu": [], "dino_pil": []}
    for r in range(rounds):
        idx = [(r * n + k) % len(ds) for k in range(n)]
        t = time.perf_counter()
        items = [ds.crop_item(i, i, cfg) for i in idx]
        times["bcssl_workers"].append(time.perf_counter() - t)
        batch = CropBatch.stack(items, list(range(n)), cfg)
        t = time.perf_counter()
        mc.from_crops(batch.groups, r, batch.positions, n)
        times["bcssl_photometric_cpu"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in idx:
            pil[i]
        times["dino_pil"].append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    ms = {k: round(statistics.median(v) / n * 1e3, 2) for k, v in times.items()}
    w, p, d = ms["bcssl_workers"], ms["bcssl_photometric_cpu"], ms["dino_pil"]
    print(f"\ndata path per image, 1 thread ({rounds} rounds of {n} images, 2x224 + 10x96):")
    print(f"  bcssl workers (decode + crops from the original) {w:7.2f} ms")
    print(f"  bcssl photometric part, batched on the CPU       {p:7.2f} ms")
    print(f"  DINO's per-image PIL pipeline                    {d:7.2f} ms")
    print(f"  PIL / bcssl workers = {d / w:.2f} (CPU per image in the loader when the photometric part is on a GPU); "
          f"PIL / bcssl all on the CPU = {d / (w + p):.2f}")
    return {**ms, "pil_over_workers": round(d / w, 3), "pil_over_all_cpu": round(d / (w + p), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bcssl_imagenet_like", help="folder for the JPEGs (kept for reuse)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--side", default="200,600", help="min,max side in pixels")
    ap.add_argument("--cases", default="bcssl_t,demo", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--batch-t", type=int, default=4, help="batch of the bcssl_t case (reduced: CPU)")
    ap.add_argument("--batch-demo", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="loader workers of (a) and (c) alike")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-rounds", type=int, default=3, help="rounds of the per-image data-path timing (0: skip)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE for every case")
    args = ap.parse_intermixed_args(argv)
    lo, hi = (int(v) for v in args.side.split(","))
    folder = write_folder(Path(args.out), args.images, lo, hi)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; valid: {', '.join(CASES)}")
    results = {}
    for name in cases:
        preset, extra = CASES[name]
        batch = args.batch_t if name == "bcssl_t" else args.batch_demo
        tt = ["--config", preset, "--batch", str(batch), "--workers", str(args.workers), "--steps", str(args.steps),
              "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--device", args.device, "--amp", "none",
              *(["--threads", str(args.threads)] if args.threads else []),
              "data.name=image_folder", f"data.root={folder}", f"data.workers={args.workers}", *PAPER_CROPS, *extra,
              *args.overrides]
        print(f"== {name}: {preset} {' '.join(extra + args.overrides)} (batch {batch})", flush=True)
        results[name] = train_throughput.main(tt)
    cpu = cpu_model()
    print(f"\nCPU: {cpu}; {args.images} JPEGs {lo}-{hi} px; {args.workers} loader workers for (a) and (c)")
    print(f"{'case':10s} {'crops':14s} {'batch':>5s} {'(a) img/s':>10s} {'(b) img/s':>10s} {'(c) img/s':>10s} "
          f"{'(a)/(b)':>8s} {'(a)/(c)':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['crops']:14s} {r['batch']:5d} {r['bcssl_end_to_end_img_s']:10.4g} "
              f"{r['model_only_img_s']:10.4g} {r['pil_reference_img_s']:10.4g} {r['end_to_end_over_model_only']:8.3f} "
              f"{r['end_to_end_over_pil_reference']:8.3f}")
    print("goals: (a)/(b) >= 0.9, (a)/(c) >= 1.2")
    data = data_path_costs(folder, args.data_rounds) if args.data_rounds else None
    summary = {"cpu": cpu, "images": args.images, "side": [lo, hi], "workers": args.workers, "cases": results,
               "data_path_ms_per_image": data}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
