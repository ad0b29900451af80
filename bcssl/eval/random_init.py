"""k-NN of a run's network as the trainer initialised it, before any step: the baseline each
pre-training is measured against (a large-kernel network's random features are already a good
k-NN classifier of small images, so a gain over them is what pre-training contributed).

The network is rebuilt from the run's config with the trainer's seed (``torch.manual_seed(seed)``
right before ``build_method``), so it is exactly the run's step-0 network; the k-NN is the DINO
protocol of :mod:`bcssl.eval.knn` on the full bank and query sets, without caching (there is no
checkpoint to key a cache on)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from bcssl.eval.registry import Evaluation


def random_init_knn(run_dir, overrides: Sequence[str] = (), *, device=None, progress: bool = True) -> dict:
    """Writes ``<run>/random_init.json`` and returns it."""
    import torch

    from bcssl.engine.run_dir import load_run_config, write_json
    from bcssl.engine.runtime import build_method, resolve_device
    from bcssl.eval.knn import KNNEvaluator

    cfg = load_run_config(run_dir, overrides)
    device = resolve_device(str(device) if device is not None else cfg.device)
    torch.manual_seed(cfg.seed)  # as the trainer, right before build_method (engine/trainer.py)
    method = build_method(cfg)
    backbone = method.eval_backbone(cfg.eval.encoder).to(device)
    res = KNNEvaluator(cfg, device, progress=progress)(backbone)
    result = {"run_dir": str(run_dir), "random_knn_top1": res["top1"], "random_knn_top5": res["top5"],
              "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "seed": int(cfg.seed),
              "encoder": cfg.eval.encoder}
    write_json(Path(run_dir) / "random_init.json", result)
    return result


class RandomInit(Evaluation):
    name = "random_init"
    section = "eval"  # the k-NN's settings
    sweep_metrics = {"random_knn_top1": ("k-NN top-1 at random init (%)", True),
                     "knn_gain_over_random": ("k-NN gain over random init (points)", True)}

    def run(self, run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, progress: bool = True,
            **options) -> dict:
        return random_init_knn(run_dir, overrides, progress=progress)

    def summary(self, result: dict, run_dir) -> str:
        return (f"k-NN (k={result['k']}) of the untrained network (seed {result['seed']}): "
                f"top-1 {result['random_knn_top1']:.2f}%, top-5 {result['random_knn_top5']:.2f}%")

    def sweep_values(self, result: dict) -> dict:
        return {"random_knn_top1": result["random_knn_top1"]}


EVALUATION = RandomInit()
