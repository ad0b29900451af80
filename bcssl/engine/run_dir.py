"""The run directory: resolved config, metrics log, TensorBoard, checkpoints."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from bcssl.config import load_config, to_yaml


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename): a reader never sees
    half a file, e.g. a result that marks a run or evaluation as finished."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config saved with a run (+ dotlist ``overrides``); a clear error when
    ``run_dir`` is not a run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a bcssl run directory (no config.yaml); "
                                "create one with `bcssl pretrain`")
    return load_config(str(path), list(overrides))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with a ``kind`` and the ``step``; every
    record also goes to the ``trackers`` (``bcssl.engine.trackers``: TensorBoard, CSV, W&B, MLflow).

    On resume, records written after the checkpoint's step (by the killed run) are dropped, so
    the log describes exactly one history.
    """

    def __init__(self, path: Path, resume_step: int | None = None, trackers: list | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.trackers = list(trackers or [])

    def write(self, kind: str, step: int, **values: Any) -> dict:
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            t.log(kind, step, {k: v for k, v in record.items() if k not in ("kind", "step")})
        return record

    def summary(self, step: int, **values: Any) -> None:
        """The run's final results: one ``result`` record, and each tracker's summary."""
        record = self.write("result", step, **values)
        for t in self.trackers:
            t.summary({k: v for k, v in record.items() if k not in ("kind", "step")})

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """``<run_dir>/config.yaml``: the resolved config, written atomically."""
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(to_yaml(cfg))  # only the active method's section: it loads back
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run identity: a run folder belongs to the config it was started with
# --------------------------------------------------------------------------------------------

#: Keys that say where and how fast a run goes, not what it computes: never compared on resume
#: (a run may resume on another machine, with other paths for its folder, threads or workers).
RESUME_IGNORED = ("run.dir", "device", "threads", "data.workers", "train.progress")
#: Keys a user may change on resume with ``--resume-changed``: the length of training (the cosine
#: schedules then stretch from the resumed step on), how often it logs and checkpoints, and the
#: evaluation settings (the k-NN monitor and the recipes evaluations read later).
RESUME_CHANGEABLE = ("train.epochs", "train.steps", "train.log_every_steps", "train.checkpoint_every_steps", "log.*",
                     "eval.*",
                     "linear.*", "detection.*")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def config_changes(started: DictConfig, now: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (started value, new value)}`` of the resolved configs, without :data:`RESUME_IGNORED`."""
    a = _flat(OmegaConf.to_container(started, resolve=True))
    b = _flat(OmegaConf.to_container(now, resolve=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _matches(k, RESUME_IGNORED)}


def check_resume_config(run_dir: str | os.PathLike, cfg: DictConfig, allow_changes: bool = False,
                        started: DictConfig | None = None) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``run_dir`` with a config other than the one it was started with.

    ``started``: that config (default: ``<run_dir>/config.yaml``). Returns the changes made (only
    :data:`RESUME_CHANGEABLE` keys, and only with ``allow_changes``; else nothing may differ).

    Raises:
        ConfigError: one line naming every differing key and the way forward.
    """
    from bcssl.config import ConfigError

    if started is None:
        started = load_run_config(run_dir)
    changes = config_changes(started, cfg)
    if not changes:
        return {}
    refused = {k: v for k, v in changes.items() if not (allow_changes and _matches(k, RESUME_CHANGEABLE))}
    if not refused:
        return changes
    listed = ", ".join(f"{k} ({_show(a)} -> {_show(b)})" for k, (a, b) in refused.items())
    allowed = ", ".join(RESUME_CHANGEABLE)
    if allow_changes:
        raise ConfigError(f"{run_dir} was started with another config, and --resume-changed only allows "
                          f"{allowed}; these differ: {listed}. Start a new run with another run.name=...")
    if all(_matches(k, RESUME_CHANGEABLE) for k in refused):
        way = "Add --resume-changed to continue this run with them, or start a new run with another run.name=..."
    else:
        way = (f"Start a new run with another run.name=... (--resume-changed continues a run only with changes "
               f"to {allowed})")
    raise ConfigError(f"{run_dir} was started with another config; differing keys: {listed}. {way}")


def _show(v: Any) -> str:
    return "null" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
