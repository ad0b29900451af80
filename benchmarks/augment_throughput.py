"""Throughput of the batched multi-crop (``bcssl.data.multicrop.MultiCrop``) vs DINO's PIL pipeline.

Both make the same crops (default 2 x 224 + 8 x 96 from 256 x 256 uint8 images) in this process,
timed in alternation so that load from other processes hits both alike. The PIL reference is
per image, as in one DataLoader worker (PIL itself is single-threaded), and includes the collate
(stacking the per-image crops into batches); the batched path starts from the uint8 batch on
``--device``. ``--threads`` sets torch's intra-op threads (once: switching the count between
runs is slow); ``--threads 1`` compares the two per CPU core. On a machine loaded by other
processes, more threads than free cores make PyTorch's CPU ops collapse (spinning workers).

    python benchmarks/augment_throughput.py --batch 64 --iters 3 --threads 1

Prints images/s of each and the ratio (last line: one JSON object). Goal (issue 3): >= 3x at
2x224 + 8x96 on one core (measured 3.5-3.6x with ``--threads 1`` on a shared 2-core machine, where
the grid_sample version made 2.0-2.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcssl.data.multicrop import MultiCrop, MultiCropConfig  # noqa: E402
from pil_multicrop import DataAugmentationDINO, collate, to_pil  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="images per batch")
    ap.add_argument("--iters", type=int, default=3, help="timed batches per pipeline (after 1 warm-up)")
    ap.add_argument("--device", default="cpu", help="device of the batched pipeline (the PIL one is CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the batched pipeline")
    ap.add_argument("--size", type=int, default=256, help="input image side")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--skip-pil", action="store_true", help="time the batched pipeline only")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local)
    gen = torch.Generator().manual_seed(0)
    # Smooth random images (upsampled noise) so that colour ops see varied, natural-ish content.
    low = torch.randint(0, 256, (args.batch, 3, args.size // 8, args.size // 8), generator=gen)
    images = torch.nn.functional.interpolate(low.float(), size=args.size, mode="bilinear",
                                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
    batched = MultiCrop(cfg)
    images_dev = images.to(device)
    pil_images = to_pil(images)
    pil_aug = DataAugmentationDINO(cfg)

    def run_batched(i: int) -> None:
        batched(images_dev, seed=i)
        _sync(device)

    def run_pil(i: int) -> None:
        collate([pil_aug(img) for img in pil_images])

    runs = {"batched": run_batched} if args.skip_pil else {"batched": run_batched, "pil": run_pil}
    for fn in runs.values():  # warm-up (allocations, workspace, lazy init)
        fn(-1)
    times = {k: [] for k in runs}
    for i in range(args.iters):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)

    result = {"batch": args.batch, "iters": args.iters, "device": str(device), "threads": args.threads,
              "crops": f"2x{args.global_size}+{args.n_local}x{args.local_size} from {args.size}"}
    for name, ts in times.items():
        # median batch time: robust to a stray slow batch on a shared machine
        rate = args.batch / sorted(ts)[len(ts) // 2]
        result[f"{name}_imgs_per_s"] = round(rate, 1)
        print(f"{name:>8}: {rate:8.1f} images/s")
    if "pil" in times:
        result["speedup"] = round(result["batched_imgs_per_s"] / result["pil_imgs_per_s"], 2)
        print(f" speedup: {result['speedup']:8.2f}x (batched / PIL)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
