"""Detection transfer at laptop scale: Mask R-CNN fine-tuned from a pre-trained run vs from the
same network at random initialisation, on "Fashion-MNIST canvases" (a COCO-format set this
script writes: 1-3 Fashion-MNIST items per 96 px canvas, category = clothing class, mask = the
item's pixels). It is Table 4's experiment in miniature: same detector, recipe and data for both
backbones, only the initialisation differs; the gap is what the pre-training transfers.

    python benchmarks/detection_fmnist.py --run runs/demo            # ~30 min on 2 CPU cores
    python benchmarks/detection_fmnist.py --run runs/demo --epochs 1 --train-canvases 200   # smoke

Writes <out>/results.json and <out>/results.md; the run directory itself is not modified (its
config and checkpoint are copied to <out>/pretrained).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcssl.data import FASHION_MNIST_CLASSES, build_dataset, grid_canvas  # noqa: E402
from bcssl.engine import checkpoint as ckpt  # noqa: E402
from bcssl.engine.run_dir import load_run_config  # noqa: E402
from bcssl.engine.runtime import build_method  # noqa: E402
from bcssl.eval.detection import detection_of_run  # noqa: E402


def write_canvases(root: Path, split: str, n: int, images: torch.Tensor, labels: torch.Tensor, size: int,
                   seed: int) -> None:
    """``n`` canvases of ``size`` px drawn by :func:`bcssl.data.canvas.grid_canvas` (1-3 items in
    the cells of a 2 x 2 grid), written as PNGs + COCO annotations (box, mask = the item's pixels)."""
    from PIL import Image
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    items = images[:, 0].numpy()
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    records, anns = [], []
    for i in range(n):
        canvas, placed = grid_canvas(rng, items, size)
        for p in placed:
            m = np.zeros((size, size), dtype=np.uint8)
            m[p.y0:p.y0 + p.side, p.x0:p.x0 + p.side] = p.item > 20
            if m.sum() < 16:
                continue
            ys, xs = np.nonzero(m)
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(labels[p.index]) + 1,
                         "iscrowd": 0, "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                                int(ys.max() - ys.min() + 1)],
                         "area": int(m.sum()), "segmentation": rle})
        Image.fromarray(canvas).convert("RGB").save(folder / f"{i:06d}.png")
        records.append({"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size})
    (root / "annotations").mkdir(exist_ok=True)
    cats = [{"id": j + 1, "name": name} for j, name in enumerate(FASHION_MNIST_CLASSES)]
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": records, "annotations": anns, "categories": cats}))


def copy_run(src: Path, dst: Path) -> None:
    """config.yaml + the latest checkpoint (nothing else: the benchmark must not touch ``src``)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    latest = ckpt.latest(src)
    if latest is None:
        raise SystemExit(f"{src} has no checkpoint; pre-train it first (make demo writes runs/demo)")
    shutil.copy2(latest, dst / "checkpoint.pt")


def random_init_run(src: Path, dst: Path, seed: int) -> None:
    """The run's network as built before training (same config), saved as a checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.yaml", dst / "config.yaml")
    torch.manual_seed(seed)
    ckpt.save({"method": build_method(load_run_config(src)).state_dict(), "step": 0}, dst / "checkpoint.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="pre-trained run directory")
    ap.add_argument("--out", default="runs/detection_fmnist")
    ap.add_argument("--train-canvases", type=int, default=600)
    ap.add_argument("--val-canvases", type=int, default=300)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    coco = out / "coco"
    if not (coco / "annotations" / "instances_val2017.json").exists():
        cfg = load_run_config(run)
        for split, n, seed in [("train", args.train_canvases, args.seed), ("val", args.val_canvases, args.seed + 1)]:
            data = build_dataset("fashion_mnist", root=cfg.data.root, split="train" if split == "train" else "test")
            write_canvases(coco, split, n, data.images, data.labels, args.size, seed)
    over = [f"detection.root={coco}", f"detection.epochs={args.epochs}", f"detection.batch_size={args.batch}",
            f"detection.lr={args.lr}", f"detection.lr_steps=[{max(args.epochs - 1, 1)}]", "detection.warmup_iters=50",
            f"detection.min_size=[{args.size},{args.size}]", f"detection.max_size={args.size}",
            f"detection.test_size={args.size}", "detection.drop_path_rate=0.0", "detection.workers=0",
            # laptop scale: 96 px canvases hold <= 3 objects, so far fewer proposals, sampled RoIs
            # and detections per image than COCO's 1000 / 512 / 100 (the mask head's cost scales with them)
            "detection.rpn_post_nms_top_n_train=300", "detection.box_batch_size_per_image=64",
            "detection.detections_per_img=20",
            f"seed={args.seed}", "device=cpu" if not torch.cuda.is_available() else "device=auto"]
    results = {}
    for name, make in [("pretrained", lambda d: copy_run(run, d)),
                       ("random_init", lambda d: random_init_run(run, d, args.seed))]:
        d = out / name
        if not (d / "checkpoint.pt").exists():
            make(d)
        t = time.perf_counter()
        results[name] = {**detection_of_run(d, over), "bench_wall_s": time.perf_counter() - t}
    p, r = results["pretrained"], results["random_init"]
    lines = [f"Mask R-CNN on Fashion-MNIST canvases ({args.train_canvases} train / {args.val_canvases} val, "
             f"{args.size} px, {args.epochs} epochs, batch {args.batch}), backbone from `{run}`:", "",
             "| backbone init | box AP | box AP50 | mask AP | mask AP50 | fine-tune + eval s |", "|---|---|---|---|---|---|"]
    for name, x in results.items():
        lines.append(f"| {name} | {x['box_AP']:.1f} | {x['box_AP50']:.1f} | {x['mask_AP']:.1f} | "
                     f"{x['mask_AP50']:.1f} | {x['bench_wall_s']:.0f} |")
    lines += ["", f"pre-trained - random init: box AP {p['box_AP'] - r['box_AP']:+.1f}, "
                  f"mask AP {p['mask_AP'] - r['mask_AP']:+.1f}"]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
