"""``bcssl demo``: DINO pre-training of a small BC-SSL on Fashion-MNIST, then k-NN top-1 on the
10k test images next to two baselines measured the same way in the same run: raw pixels and the
same network at random initialisation."""
from __future__ import annotations

import json
import platform
import time

import torch
from omegaconf import DictConfig

from bcssl.engine.run_dir import run_dir_of
from bcssl.engine.runtime import build_method, load_run_backbone, resolve_device
from bcssl.engine.trainer import train
from bcssl.eval.knn import KNNEvaluator, knn_classify, knn_monitor
from bcssl.eval.report import write_report


def pixel_knn(evaluator: KNNEvaluator) -> dict:
    """k-NN on raw pixels (flattened, same cosine/k=20/T=0.07 protocol)."""
    def flat(loader):
        xs, ys = zip(*[(x.flatten(1).float(), y) for x, y in loader.epoch(0)])
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = flat(evaluator.train_loader)
    test_x, test_y = flat(evaluator.test_loader)
    return knn_classify(train_x, train_y, test_x, test_y, k=evaluator.cfg.eval.knn_k,
                        temperature=evaluator.cfg.eval.knn_temperature,
                        num_classes=evaluator.train_set.num_classes)


def run_demo(cfg: DictConfig) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = cfg.train.progress
    final_eval = KNNEvaluator(cfg, device, progress=progress)

    pixels = pixel_knn(final_eval)
    print(f"[demo] k-NN on raw pixels: {pixels['top1']:.2f}%", flush=True)
    torch.manual_seed(cfg.seed)  # the same initialisation the training run starts from
    random_init = final_eval(build_method(cfg).eval_backbone(cfg.eval.encoder).to(device))
    print(f"[demo] k-NN of the network at random initialisation: {random_init['top1']:.2f}%", flush=True)

    cfg.eval.final_knn = False  # the final evaluation below uses the full sets
    result = train(cfg, knn_eval=knn_monitor(cfg))

    _, backbone, _ = load_run_backbone(result.run_dir)  # the final weights, also when the run was resumed
    pretrained = final_eval(backbone.to(device))
    wall = time.perf_counter() - t_start
    summary = {
        "run_dir": result.run_dir, "epochs": result.epochs, "images_seen": result.images_seen,
        "train_s": round(result.train_s, 1), "imgs_per_s": round(result.imgs_per_s, 1),
        "knn_top1": round(pretrained["top1"], 2), "knn_top5": round(pretrained["top5"], 2),
        "baseline_pixels_knn_top1": round(pixels["top1"], 2),
        "baseline_random_knn_top1": round(random_init["top1"], 2),
        "gain_over_random": round(pretrained["top1"] - random_init["top1"], 2),
        "wall_s": round(wall, 1),
    }
    summary["protocol"] = (f"k-NN: cosine, k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, weighted vote "
                           f"(DINO); bank = {cfg.data.split} split, queries = {cfg.data.eval_split} split")
    summary["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, device {device}"
    run_dir = run_dir_of(cfg)
    (run_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["report"] = str(write_report([run_dir]))
    return summary
