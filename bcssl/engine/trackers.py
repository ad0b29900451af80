"""Experiment trackers: where a run's metrics go besides ``metrics.jsonl`` (``log.backends``).

``metrics.jsonl`` is always written and is the run's own record (the report reads it). Each
backend named in ``log.backends`` receives the same records:

- ``tensorboard``: scalars under ``<run>/tb/`` (``tensorboard --logdir runs``).
- ``csv``: ``<run>/metrics.csv``, one row per record (log step, epoch, evaluation) with one column
  per value, as timm's ``summary.csv``; the header grows when a new value appears.
- ``wandb`` (``pip install 'bcssl[wandb]'``): one W&B run per bcssl run. Offline mode (no network;
  ``wandb sync <run>/wandb/offline-run-*`` uploads later) unless ``log.wandb_mode=online`` or an API
  key is configured.
- ``mlflow`` (``pip install 'bcssl[mlflow]'``): one MLflow run per bcssl run, by default in a
  local file store ``<run.dir>/mlruns`` shared by all runs of that folder (``mlflow ui
  --backend-store-uri runs/mlruns``).

Each backend gets the resolved config once, every record, and the final results. A resumed or
preempted run continues the same W&B / MLflow run: their ids are kept in ``<run>/trackers.json``.
Only the process that writes the run folder (rank 0) opens trackers.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bcssl")

from bcssl.config.schema import LOG_BACKENDS as BACKENDS  # noqa: E402  (the config validates names with it)
#: the pip extra that installs an optional backend's package
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
IDS_FILE = "trackers.json"


class TrackerError(ValueError):
    """A tracker cannot be used as configured (e.g. its package is missing); says what to do."""


def check_backends(backends) -> list[str]:
    """The backend names of ``log.backends``, validated: unknown names and optional backends whose
    package is not installed are a :class:`TrackerError` naming the fix. Imports nothing heavy."""
    import importlib.util

    names = [str(b).lower() for b in backends]
    for name in names:
        if name not in BACKENDS:
            raise TrackerError(f"log.backends: unknown backend '{name}'; valid: {', '.join(BACKENDS)}")
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise TrackerError(f"log.backends includes {name} but the '{EXTRAS[name][0]}' package is not "
                               f"installed: pip install 'bcssl[{EXTRAS[name][1]}]'")
    return names


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _read_ids(run_dir: Path) -> dict:
    import json

    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; starting new tracker runs", path)
        return {}
    return ids if isinstance(ids, dict) else {}


def _write_ids(run_dir: Path, ids: dict) -> None:
    from bcssl.engine.run_dir import write_json

    write_json(run_dir / IDS_FILE, ids)


class Tracker:
    """One backend. ``log`` gets every record (kind, step, values); ``summary`` the final results."""

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final results of the run or of an evaluation, after they were logged as a ``result``
        record (a backend with a separate summary view, W&B, shows them there too)."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, kind, step, values):
        for k, v in _numeric(values).items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self):
        self.writer.close()


class CSVTracker(Tracker):
    """``metrics.csv``: columns ``kind, step`` then every value name in order of first appearance.

    A new value name rewrites the file once with the wider header (rare: the first record of each
    kind); otherwise rows are appended. On resume, rows after the checkpoint's step are dropped, as
    in ``metrics.jsonl``.
    """

    FIXED = ["kind", "step"]

    def __init__(self, path: Path, resume_step: int | None, *, append: bool = False):
        self.path = Path(path)
        self.columns = list(self.FIXED)
        if (resume_step is not None or append) and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.FIXED)
                rows = [r for r in reader if append or (r.get("step") and int(float(r["step"])) <= resume_step)]
            if not append:
                self._rewrite(rows)
        else:
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp.{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def log(self, kind, step, values):
        row = {"kind": kind, "step": step, **{k: ("" if v is None else v) for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, ids: dict, new_run: bool):
        import wandb

        lc = cfg.log
        mode = lc.wandb_mode or os.environ.get("WANDB_MODE")
        if not mode:
            mode = "online" if (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()) else "offline"
        self.run_id = ids.get("wandb") or secrets.token_hex(4)  # W&B ids: 8 lowercase characters
        ids["wandb"] = self.run_id
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, name=cfg.run.name, id=self.run_id,
                              resume="allow", dir=str(run_dir), mode=mode,
                              config=OmegaConf.to_container(cfg, resolve=True))
        if new_run:
            log.info("W&B run %s (%s mode)", self.run_id, mode)

    def log(self, kind, step, values):
        v = {f"{kind}/{k}": x for k, x in _numeric(values).items()}
        if v:
            self.run.log(v, step=step)

    def summary(self, values):
        self.run.summary.update(_numeric(values))

    def close(self):
        self.run.finish()


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def mlflow_uri(cfg: DictConfig) -> str:
    """``log.mlflow_uri``, or the local file store ``<run.dir>/mlruns``."""
    return cfg.log.mlflow_uri or Path(cfg.run.dir).resolve().joinpath("mlruns").as_uri()


class MlflowTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, ids: dict, new_run: bool):
        uri = mlflow_uri(cfg)
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store for local use but asks for an explicit opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = ids.get("mlflow")
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(cfg.log.mlflow_experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.log.mlflow_experiment)
            self.run_id = self.client.create_run(exp_id, run_name=cfg.run.name).info.run_id
            ids["mlflow"] = self.run_id
            params = {k: str(v)[:6000] for k, v in _flat(OmegaConf.to_container(cfg, resolve=True)).items()}
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            log.info("MLflow run %s in %s", self.run_id, uri)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, kind, step, values):
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{k}", v, now, step) for k, v in _numeric(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self):
        self.client.set_terminated(self.run_id)


def open_trackers(cfg: DictConfig, run_dir: str | os.PathLike, resume_step: int | None) -> list[Tracker]:
    """The trackers of ``log.backends`` for a run (``resume_step``: None for a new run, else the
    checkpoint's step: the W&B / MLflow runs of ``<run>/trackers.json`` continue)."""
    run_dir = Path(run_dir)
    names = check_backends(cfg.log.backends)
    ids = _read_ids(run_dir) if resume_step is not None else {}
    before = dict(ids)
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            try:
                trackers.append(TensorBoardTracker(run_dir))
            except ImportError:  # tensorboard is a dependency, but may be missing in a stripped install
                log.warning("log.backends includes tensorboard but it cannot be imported; skipped")
        elif name == "csv":
            trackers.append(CSVTracker(run_dir / "metrics.csv", resume_step))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg, run_dir, ids, resume_step is None))
        elif name == "mlflow":
            trackers.append(MlflowTracker(cfg, run_dir, ids, resume_step is None))
    if ids != before or (ids and resume_step is None):
        _write_ids(run_dir, ids)
    return trackers


def log_results(cfg: DictConfig, run_dir: str | os.PathLike, name: str, result: Mapping[str, Any]) -> None:
    """Add an evaluation's results (``bcssl eval NAME RUN``) to the run's W&B / MLflow runs (those
    of ``<run>/trackers.json``) and its ``metrics.csv``; a backend whose run is not there is skipped."""
    run_dir = Path(run_dir)
    names = [n for n in check_backends(cfg.log.backends) if n != "tensorboard"]
    ids = _read_ids(run_dir)
    values = {f"{name}_{k}" if not k.startswith(name) else k: v for k, v in _numeric(result).items()}
    for n in names:
        try:
            if n == "csv" and (run_dir / "metrics.csv").is_file():
                t: Tracker = CSVTracker(run_dir / "metrics.csv", None, append=True)
            elif n == "wandb" and "wandb" in ids:
                t = WandbTracker(cfg, run_dir, ids, new_run=False)
            elif n == "mlflow" and "mlflow" in ids:
                t = MlflowTracker(cfg, run_dir, ids, new_run=False)
            else:
                continue
            t.log(name, int(result.get("checkpoint_step") or 0), values)
            t.summary(values)
            t.close()
        except Exception as e:  # a tracker must never lose an evaluation already written to disk
            log.warning("could not add %s results to the %s run: %s", name, n, e)
