"""``bcssl sweep``: the paper's kernel-size x BatchNorm study (Table 2, Figure 2, Tables 5 and 6)
as one command.

Every combination of the ``--grid`` values (x ``--seeds``) is one ordinary run directory under
``<out>/runs/<name>``, trained with :func:`bcssl.engine.trainer.train` (so an interrupted one
resumes from its checkpoint) and then evaluated with k-NN, the linear probe and on-the-fly
corruptions. ``<run>/sweep_result.json`` marks a finished combination: a rerun skips it. The
summary (``<out>/report.md`` + PNGs) pivots the results: rows = the other grid keys (dw_norm),
columns = ``model.kernel_size`` (or the first grid key), cells = mean +- std over seeds.

Runs go one after the other in this process, or one job per combination (``--index I``, e.g. a
Slurm array task; ``--launcher slurm`` writes the sbatch script), then ``--summarize``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from bcssl.config import ConfigError, load_config
from bcssl.engine.distributed import env_rank
from bcssl.engine.run_dir import write_json

log = logging.getLogger("bcssl")

RESULT = "sweep_result.json"
SPEC = "sweep.json"
EVALS = ("knn", "linear", "robustness")  # the default --evals
CORRUPTION_GROUPS = {  # ImageNet-C's four families
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}


@dataclass(frozen=True)
class Combination:
    index: int
    assignments: tuple[tuple[str, str], ...]  # (key, value) of each grid key, grid order
    seed: int

    @property
    def name(self) -> str:
        # "kernel_size=9,dw_norm=bn+ln,seed=0": readable, unique, shell-safe without quotes (a list
        # value [0.6,1.0] is spelt 0.6-1.0)
        def spelt(v: str) -> str:
            return v.strip("[]").replace(",", "-").replace(" ", "") if v.startswith("[") else v
        return ",".join([f"{k.split('.')[-1]}={spelt(v)}" for k, v in self.assignments] + [f"seed={self.seed}"])

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.assignments] + [f"seed={self.seed}"]


def split_values(text: str) -> list[str]:
    """``"3,[3,5,7,9],9"`` -> ``["3", "[3,5,7,9]", "9"]``: commas inside brackets belong to a list value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [v.strip() for v in values + [current] if v.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["model.kernel_size=3,5", "model.dw_norm=ln,bn+ln", "crops.global_scale=[0.4,1.0],[0.6,1.0]"]``
    -> ``{key: [values]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = split_values(values)
        if not sep or not key or not vals:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. model.kernel_size=3,5,7,9,15)")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--grid {key}: repeated values in {vals}")
        grid[key.strip()] = vals
    if not grid:
        raise ConfigError("--grid needs at least one KEY=V1,V2,...")
    return grid


def _check_model(cfg: DictConfig, what: str) -> None:
    """Build ``model.*`` on the meta device (no memory, no time): a value the backbone refuses
    fails here, before the sweep trains the combinations listed before it."""
    import torch

    from bcssl.methods.base import backbone_from_config

    try:
        with torch.device("meta"):
            backbone_from_config(cfg.model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: {e}") from None


class Sweep:
    def __init__(self, config: str, grid: dict[str, list[str]], seeds: Sequence[int] | None = None,
                 overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
                 evals: Sequence[str] = EVALS, cam: bool = True):
        self.config, self.grid, self.overrides = config, dict(grid), list(overrides)
        from bcssl.eval.registry import names

        for e in evals:
            if e not in names():
                raise ConfigError(f"unknown evaluation {e!r}; choose from {', '.join(names())}")
        self.evals, self.cam = tuple(evals), cam
        base = load_config(config, self.overrides)  # validates the preset, overrides and grid keys early
        for key, values in self.grid.items():
            for v in values:
                cfg = load_config(config, self.overrides + [f"{key}={v}"])
                if key.startswith("model."):
                    _check_model(cfg, f"--grid {key}={v}")
        if "robustness" in self.evals and base.data.name == "image_folder" and not base.robustness.folder:
            raise ConfigError("the sweep's robustness evaluation of an image folder needs the released ImageNet-C "
                              "folder: robustness.folder=/path/to/imagenet-c robustness.kind=imagenet_c "
                              "(or --evals knn,linear)")
        self.seeds = [int(s) for s in seeds] if seeds else [int(base.seed)]
        self.out = Path(out) if out else Path(base.run.dir) / f"sweep_{base.run.name}"
        keys = list(self.grid)
        self.combinations = [Combination(i, tuple(zip(keys, p[:-1])), p[-1]) for i, p in enumerate(
            itertools.product(*self.grid.values(), self.seeds))]
        # pivot: columns = kernel size when swept, rows = the other keys
        self.col_key = "model.kernel_size" if "model.kernel_size" in self.grid else keys[0]
        self.row_keys = [k for k in keys if k != self.col_key]

    # ------------------------------------------------------------------------------------- runs
    def run_config(self, combo: Combination) -> DictConfig:
        return load_config(self.config, self.overrides + combo.overrides() +
                           [f"run.dir={self.out / 'runs'}", f"run.name={combo.name}"])

    def run_dir(self, combo: Combination) -> Path:
        return self.out / "runs" / combo.name

    def result(self, combo: Combination) -> dict | None:
        path = self.run_dir(combo) / RESULT
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a half-written marker means "not finished": the run is evaluated again

    def check_spec(self) -> None:
        """The sweep folder remembers its preset and fixed overrides: reusing the folder with other
        ones would mix incomparable runs, so that is an error. Grid values and seeds may grow."""
        path = self.out / SPEC
        spec = {"config": self.config, "overrides": self.overrides}
        if path.is_file():
            old = json.loads(path.read_text())
            if {k: old.get(k) for k in spec} != spec:
                raise ConfigError(f"{self.out} holds a sweep of --config {old.get('config')} with overrides "
                                  f"{old.get('overrides')}; this one is {self.config} with {self.overrides}: "
                                  "use another --out")
        if env_rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(path, {**spec, "grid": self.grid, "seeds": self.seeds})

    def run_one(self, combo: Combination, *, train_only: bool = False, progress: bool = True) -> dict | None:
        """Train (or resume) and evaluate one combination; returns its result (None if train_only)."""
        from bcssl.engine.trainer import train
        from bcssl.eval.knn import knn_monitor

        done = self.result(combo)
        if done is not None:
            log.info("sweep: %s already finished, skipped", combo.name)
            return done
        cfg = self.run_config(combo)
        log.info("sweep [%d/%d]: %s", combo.index + 1, len(self.combinations), combo.name)
        t0 = time.perf_counter()
        trained = train(cfg, knn_eval=knn_monitor(cfg))
        if train_only:
            return None
        values = self.evaluate(combo, progress=progress)  # every process: k-NN and the probe shard the work
        if env_rank() != 0:
            return None
        result = {"name": combo.name, "index": combo.index, "assignments": dict(combo.assignments),
                  "seed": combo.seed, "run_dir": str(self.run_dir(combo)), "train_s": trained.train_s,
                  "imgs_per_s": trained.imgs_per_s, "epochs": trained.epochs, "images_seen": trained.images_seen}
        if trained.knn_top1 is not None:  # the k-NN monitor's last value (eval.knn_* limits), a cheap signal
            result["monitor_knn_top1"] = trained.knn_top1
        result.update(values)
        result["wall_s"] = time.perf_counter() - t0
        write_json(self.run_dir(combo) / RESULT, result)
        return result

    def evaluate(self, combo: Combination, progress: bool = True) -> dict:
        """Every evaluation of ``--evals`` (and what they require, first) on the run; the values
        each keeps for the summary (:meth:`~bcssl.eval.registry.Evaluation.sweep_values`; rank 0)."""
        from bcssl.eval.registry import in_order

        run, out, main = self.run_dir(combo), {}, env_rank() == 0
        for ev in in_order(self.evals):
            if ev.distributed or main:  # under torchrun the others run on rank 0 alone
                result = ev.run(run, progress=progress)
                if main:
                    out.update(ev.sweep_values(result))
        if "corruption_error" in out and "clean_error" not in out and "linear_top1" in out:
            out["clean_error"] = 100 - out["linear_top1"]  # released ImageNet-C has no clean images
        if "knn_top1" in out and "random_knn_top1" in out:
            out["knn_gain_over_random"] = out["knn_top1"] - out["random_knn_top1"]
        return out

    def run(self, indices: Sequence[int] | None = None, *, train_only: bool = False, summarize: bool = True,
            progress: bool = True) -> dict:
        self.check_spec()
        todo = self.combinations if indices is None else [self._combo(i) for i in indices]
        for combo in todo:
            self.run_one(combo, train_only=train_only, progress=progress)
        if summarize and not train_only and env_rank() == 0:
            return self.summarize()
        return {"out": str(self.out), "ran": [c.name for c in todo]}

    def _combo(self, index: int) -> Combination:
        if not 0 <= index < len(self.combinations):
            raise ConfigError(f"--index {index} is out of range: this sweep has {len(self.combinations)} "
                              f"combinations (0..{len(self.combinations) - 1})")
        return self.combinations[index]

    # -------------------------------------------------------------------------------- summary
    def summarize(self) -> dict:
        from bcssl.sweep_report import write_sweep_report

        results = {c.name: self.result(c) for c in self.combinations}
        return write_sweep_report(self, results)

    # ---------------------------------------------------------------------------------- Slurm
    def slurm_script(self, cli_args: str, gpus: int = 8) -> Path:
        """An sbatch array script: one task per combination (torchrun training on ``gpus`` GPUs,
        then the evaluations on one process); ``bcssl sweep ... --summarize`` afterwards."""
        n = len(self.combinations)
        script = f"""#!/bin/bash
#SBATCH --job-name=bcssl-sweep
#SBATCH --array=0-{n - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={8 * gpus}
#SBATCH --output={self.out}/slurm-%A_%a.out
# {n} combinations of {self.config}; after the array finishes:
#   bcssl sweep {cli_args} --summarize
set -euo pipefail
torchrun --standalone --nproc_per_node={gpus} -m bcssl sweep {cli_args} --index "$SLURM_ARRAY_TASK_ID" --train-only
bcssl sweep {cli_args} --index "$SLURM_ARRAY_TASK_ID" --no-summary
"""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "sweep.sbatch"
        path.write_text(script)
        return path

