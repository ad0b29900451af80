"""The run directory: resolved config, metrics log, TensorBoard, checkpoints."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

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


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The resolved config saved with a run; a clear error when ``run_dir`` is not a run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a bcssl run directory (no config.yaml); "
                                "create one with `bcssl pretrain`")
    return load_config(str(path))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with a ``kind`` and the ``step``.

    On resume, records written after the checkpoint's step (by the killed run) are dropped, so
    the log describes exactly one history.
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # TensorBoard is optional at run time
                self._tb = None

    def write(self, kind: str, step: int, **values: Any) -> dict:
        record = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(to_yaml(cfg))  # only the active method's section: it loads back
