"""``bcssl demo``: DINO pre-training of a small BC-SSL on Fashion-MNIST, then k-NN top-1 on the
10k test images next to three baselines measured the same way in the same run: raw pixels,
mean-centred pixels and the same network at random initialisation.

With ``demo.budget_min`` set (the ``demo_fmnist`` preset: 15 minutes) the whole command holds that
wall-clock budget on any machine: after the baselines it times a few training steps, reserves the
time the final evaluation and the report will take (measured on the random-init evaluation it just
ran) and sets ``train.steps`` to fill the rest. The decision is saved as ``<run>/budget.json``; a
rerun of an interrupted demo reuses it, so the resumed run is the run that was planned.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bcssl.engine.run_dir import read_metrics, run_dir_of, write_json
from bcssl.engine.runtime import TrainingError, build_method, cpu_model, load_run_backbone, resolve_device
from bcssl.engine.trainer import train
from bcssl.eval.knn import KNNEvaluator, knn_classify, knn_monitor
from bcssl.eval.report import write_report

BUDGET_FILE = "budget.json"
REPORT_S = 15.0  # report.md + figures (matplotlib's import and three PNGs), generous on a slow CPU


def process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the budget also pays for the
    interpreter start and the imports that ran before :func:`run_demo`."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _flat_pixels(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.flatten(1).float(), y) for x, y in loader.epoch(0)])
    return torch.cat(xs), torch.cat(ys)


class Banks:
    """Features of the k-NN bank and queries, scored on the full sets and on the k-NN monitor's
    subset (the first ``eval.knn_train_limit`` / ``knn_test_limit`` images, as the monitor reads
    them), so each curve of the demo's figure is drawn next to baselines of its own bank."""

    def __init__(self, cfg: DictConfig, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes
        self.subset = (cfg.eval.knn_train_limit, cfg.eval.knn_test_limit)

    def knn(self, train_f, train_y, test_f, test_y) -> dict:
        def score(n_train, n_test) -> dict:
            r = knn_classify(train_f[:n_train], train_y[:n_train], test_f[:n_test], test_y[:n_test],
                             k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_temperature,
                             num_classes=self.num_classes)
            return {"top1": r["top1"], "top5": r["top5"]}
        out = {"full": score(None, None)}
        if any(self.subset):
            out["monitor"] = score(*self.subset)
        return out


def pixel_baselines(evaluator: KNNEvaluator, banks: Banks) -> dict:
    """k-NN on raw pixels (flattened, the same cosine/k/T protocol), plain and mean-centred (the
    training images' mean pixel vector subtracted from bank and queries: cosine similarity then
    compares deviations from the average garment, the stronger of the two pixel baselines)."""
    train_x, train_y = _flat_pixels(evaluator.train_loader)
    test_x, test_y = _flat_pixels(evaluator.test_loader)
    mean = train_x.mean(0, keepdim=True)
    return {"pixels": banks.knn(train_x, train_y, test_x, test_y),
            "pixels_centred": banks.knn(train_x - mean, train_y, test_x - mean, test_y)}


def backbone_knn(evaluator: KNNEvaluator, banks: Banks, backbone) -> dict:
    train_f, train_y = evaluator.features(backbone, "train")
    test_f, test_y = evaluator.features(backbone, "test")
    return banks.knn(train_f, train_y, test_f, test_y)


def probe_speed(cfg: DictConfig) -> dict:
    """Train ``demo.probe_steps`` steps of the real run (same data, model, crops, threads) in a
    scratch directory and return the median img/s of the steps after the first, and the seconds
    the trainer spends outside its steps (data loading, building the model)."""
    n = int(cfg.demo.probe_steps)
    with tempfile.TemporaryDirectory(prefix="bcssl-probe-") as tmp:
        probe = OmegaConf.merge(cfg, {"run": {"dir": tmp, "name": "probe"},
                                      "train": {"steps": n, "log_every_steps": 1, "checkpoint_every_steps": 0,
                                                "progress": False},
                                      "eval": {"knn_every": 0, "final_knn": False},
                                      "log": {"backends": ["csv"]}})  # no tracker run for the probe
        t = time.perf_counter()
        result = train(probe)
        wall = time.perf_counter() - t
        rates = [r["imgs_per_s"] for r in read_metrics(Path(tmp) / "probe") if r.get("kind") == "train"]
    timed = rates[1:] or rates
    if not timed:
        raise TrainingError(f"demo.probe_steps={n}: the speed probe logged no training step")
    return {"imgs_per_s": statistics.median(timed), "steps": len(timed),
            "setup_s": max(wall - result.train_s, 0.0)}


def plan_budget(cfg: DictConfig, *, spent_s: float, eval_s: float, n_eval: int, steps_per_epoch: int) -> dict:
    """How many training steps fit in ``demo.budget_min`` minutes: the budget minus the time spent
    so far, the speed probe, the final k-NN (``eval_s``: what the random-init k-NN on the same
    ``n_eval`` images took), the k-NN monitor (the same per image, on its subset, once per epoch),
    the report and a margin of ``demo.margin`` of the budget."""
    t = time.perf_counter()
    speed = probe_speed(cfg)
    spent_s += time.perf_counter() - t
    budget_s = 60.0 * float(cfg.demo.budget_min)
    margin_s = float(cfg.demo.margin) * budget_s
    per_image_eval_s = eval_s / max(n_eval, 1)
    monitor_images = sum(x for x in (cfg.eval.knn_train_limit, cfg.eval.knn_test_limit) if x) or n_eval
    batch = cfg.train.batch_size
    fixed_s = spent_s + eval_s + REPORT_S + margin_s + speed["setup_s"]
    epochs = 1
    while True:  # the monitor runs once per eval.knn_every epochs: find the length whose evaluations fit too
        n_monitor = math.ceil(epochs / cfg.eval.knn_every) if cfg.eval.knn_every else 0
        monitor_s = n_monitor * monitor_images * per_image_eval_s
        steps = int((budget_s - fixed_s - monitor_s) * speed["imgs_per_s"] / batch)
        if steps <= epochs * steps_per_epoch:
            break
        epochs += 1
    if steps < 1:
        raise TrainingError(
            f"demo.budget_min={cfg.demo.budget_min} leaves no time to train: {spent_s:.0f} s went to the baselines "
            f"and the speed probe and {eval_s:.0f} s are needed for the final k-NN; raise --budget-min")
    return {
        "budget_min": float(cfg.demo.budget_min), "steps": steps, "images": steps * batch,
        "epochs": round(steps / steps_per_epoch, 3), "planned_train_s": round(steps * batch / speed["imgs_per_s"], 1),
        "probe_imgs_per_s": round(speed["imgs_per_s"], 1), "probe_steps": speed["steps"],
        "spent_before_training_s": round(spent_s, 1), "reserved_final_knn_s": round(eval_s, 1),
        "reserved_monitor_knn_s": round(monitor_s, 1), "reserved_report_s": REPORT_S,
        "reserved_setup_s": round(speed["setup_s"], 1), "reserved_margin_s": round(margin_s, 1),
        "cpu": cpu_model(), "threads": torch.get_num_threads(),
    }


def describe_plan(plan: dict) -> str:
    return (f"budget {plan['budget_min']:g} min: {plan['spent_before_training_s']:.0f} s went to the baselines and "
            f"a {plan['probe_steps']}-step speed probe ({plan['probe_imgs_per_s']:.1f} img/s on {plan['cpu']}, "
            f"{plan['threads']} threads); {plan['reserved_final_knn_s']:.0f} s kept for the final k-NN, "
            f"{plan['reserved_monitor_knn_s']:.0f} s for the monitor, "
            f"{plan['reserved_report_s'] + plan['reserved_setup_s'] + plan['reserved_margin_s']:.0f} s for set-up, "
            f"report and margin -> train {plan['steps']} steps = {plan['images']:,} images "
            f"({plan['epochs']:.2f} epochs, ~{plan['planned_train_s']:.0f} s)")


def run_demo(cfg: DictConfig, started: float | None = None) -> dict:
    """The demo; ``started`` (a ``time.perf_counter()`` value, default now) is when the command
    began: the budget and the reported wall time count from there."""
    t_start = time.perf_counter() if started is None else started
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = cfg.train.progress
    final_eval = KNNEvaluator(cfg, device, progress=progress)
    banks = Banks(cfg, final_eval.train_set.num_classes)

    pixels = pixel_baselines(final_eval, banks)
    print(f"[demo] k-NN on raw pixels: {pixels['pixels']['full']['top1']:.2f}%, mean-centred pixels: "
          f"{pixels['pixels_centred']['full']['top1']:.2f}%", flush=True)
    torch.manual_seed(cfg.seed)  # the same initialisation the training run starts from
    t = time.perf_counter()
    random_init = backbone_knn(final_eval, banks, build_method(cfg).eval_backbone(cfg.eval.encoder).to(device))
    eval_s = time.perf_counter() - t
    print(f"[demo] k-NN of the network at random initialisation: {random_init['full']['top1']:.2f}%", flush=True)

    cfg.eval.final_knn = False  # the final evaluation below uses the full sets
    run_dir = run_dir_of(cfg)
    plan = None
    if cfg.demo.budget_min is not None:
        if (run_dir / BUDGET_FILE).is_file():  # a rerun of an interrupted demo trains the run it planned
            plan = json.loads((run_dir / BUDGET_FILE).read_text())
            print(f"[demo] resuming with the saved plan ({run_dir / BUDGET_FILE}): {plan['steps']} steps", flush=True)
        else:
            n_bank, n_queries = len(final_eval.train_set), len(final_eval.test_set)
            steps_per_epoch = min(n_bank, cfg.data.limit or n_bank) // cfg.train.batch_size
            if steps_per_epoch < 1:
                raise TrainingError(f"{n_bank} training images (data.limit={cfg.data.limit}) give no batch of "
                                    f"train.batch_size={cfg.train.batch_size}")
            plan = plan_budget(cfg, spent_s=time.perf_counter() - t_start, eval_s=eval_s,
                               n_eval=n_bank + n_queries, steps_per_epoch=steps_per_epoch)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / BUDGET_FILE, plan)
        cfg.train.steps = plan["steps"]
        print(f"[demo] {describe_plan(plan)}", flush=True)
    result = train(cfg, knn_eval=knn_monitor(cfg))

    _, backbone, _ = load_run_backbone(result.run_dir)  # the final weights, also when the run was resumed
    pretrained = backbone_knn(final_eval, banks, backbone.to(device))
    wall = time.perf_counter() - t_start

    def top1(r: dict, which: str = "full") -> float:
        return round(r[which]["top1"], 2)

    summary = {
        "run_dir": result.run_dir, "epochs": plan["epochs"] if plan else result.epochs,
        "images_seen": result.images_seen, "train_s": round(result.train_s, 1),
        "imgs_per_s": round(result.imgs_per_s, 1), "knn_top1": top1(pretrained),
        "knn_top5": round(pretrained["full"]["top5"], 2),
        "baseline_pixels_knn_top1": top1(pixels["pixels"]),
        "baseline_centred_pixels_knn_top1": top1(pixels["pixels_centred"]),
        "baseline_random_knn_top1": top1(random_init),
        "gain_over_random": round(top1(pretrained) - top1(random_init), 2),
        "gain_over_centred_pixels": round(top1(pretrained) - top1(pixels["pixels_centred"]), 2),
        "wall_s": round(wall, 1),
    }
    if "monitor" in random_init:  # the k-NN monitor's bank: what its curve is compared with
        summary["monitor_baselines"] = {
            "bank": cfg.eval.knn_train_limit, "queries": cfg.eval.knn_test_limit,
            "pixels_knn_top1": top1(pixels["pixels"], "monitor"),
            "centred_pixels_knn_top1": top1(pixels["pixels_centred"], "monitor"),
            "random_knn_top1": top1(random_init, "monitor"),
            "pretrained_knn_top1": top1(pretrained, "monitor")}
    if plan is not None:
        summary["budget"] = plan
    summary["protocol"] = (f"k-NN: cosine, k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, weighted vote "
                           f"(DINO); bank = {cfg.data.split} split, queries = {cfg.data.eval_split} split")
    summary["machine"] = f"{cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, device {device}"
    write_json(Path(result.run_dir) / "demo.json", summary)
    summary["report"] = str(write_report([result.run_dir]))
    return summary
