"""Experiment trackers: CSV, TensorBoard, W&B (offline) and MLflow (local file store) receive a run's
config, every record and the final results; a killed-and-resumed run continues the same tracker runs."""
from __future__ import annotations

import csv
import json

import pytest

from bcssl.cli import main
from bcssl.config import ConfigError, load_config
from bcssl.engine import trackers
from bcssl.engine.runtime import TrainingError
from bcssl.engine.trainer import train
from tests.conftest import tiny_config

ALL = "log.backends=[tensorboard,csv,wandb,mlflow]"


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is installed by `make test` (pip install -e '.[dev]')")
    pytest.importorskip("mlflow", reason="the mlflow extra is installed by `make test`")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mlflow_history(run, key):
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=(run.parent / "mlruns").resolve().as_uri())
    return ids, client, [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]


def test_all_four_backends_and_resume_continues_the_same_runs(tmp_path, tiny_fmnist, offline_wandb):
    # killed after epoch 1 of 2 (a finished 1-epoch run resumed with train.epochs=2 is the same history)
    cfg = tiny_config(tmp_path, tiny_fmnist, ALL, "train.epochs=1")
    train(cfg)
    run = tmp_path / "runs" / "tiny"
    ids_first = json.loads((run / "trackers.json").read_text())
    assert set(ids_first) == {"wandb", "mlflow"}
    assert any((run / "tb").iterdir())  # tensorboard
    rows = _csv_rows(run / "metrics.csv")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 4 and all(float(r["loss"]) > 0 for r in train_rows)  # the loss column
    assert [r for r in rows if r["kind"] == "result"][0]["images_seen"] == "64"

    train(tiny_config(tmp_path, tiny_fmnist, ALL, "train.epochs=2"), resume_changed=True)
    ids, client, loss = _mlflow_history(run, "train/loss")
    assert ids == ids_first  # the same W&B and MLflow runs continue
    assert [s for s, _ in loss] == list(range(1, 9))  # steps 1..8 in one MLflow run
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.data.params["model.name"] == cfg.model.name  # the resolved config
    assert mlrun.data.metrics["result/images_seen"] == 128  # the final results
    wandb_dirs = sorted((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(wandb_dirs) == 2  # one offline segment per process, both of the same W&B run id
    assert all((d / f"run-{ids['wandb']}.wandb").stat().st_size > 0 for d in wandb_dirs)
    rows = _csv_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["kind"] == "train"] == list(range(1, 9))

    # an evaluation afterwards lands in the same tracker runs
    assert main(["eval", "knn", str(run), "--json"]) == 0
    top1 = json.loads((run / "knn.json").read_text())["knn_top1"]
    _, _, knn = _mlflow_history(run, "knn/knn_top1")
    assert knn == [(8, pytest.approx(top1))]
    assert [float(r["knn_top1"]) for r in _csv_rows(run / "metrics.csv") if r["kind"] == "knn"] == [top1]


def test_resume_drops_csv_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    t = trackers.CSVTracker(path, None)
    for step in (1, 2, 3):
        t.log("train", step, {"loss": 1.0 / step})
    t.log("knn", 3, {"top1": 50.0})  # a new column widens the header
    rows = _csv_rows(path)
    assert [r["kind"] for r in rows] == ["train"] * 3 + ["knn"] and rows[0]["top1"] == "" and rows[3]["top1"] == "50.0"
    trackers.CSVTracker(path, 2)  # resumed from the checkpoint of step 2
    assert [int(r["step"]) for r in _csv_rows(path)] == [1, 2]


def test_missing_optional_package_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(trackers.TrackerError, match=r"pip install 'bcssl\[wandb\]'"):
        trackers.check_backends(["csv", "wandb"])
    with pytest.raises(ConfigError, match="unknown backend.*neptune"):
        load_config("demo_fmnist", ["log.backends=[csv,neptune]"])
    assert not issubclass(trackers.TrackerError, TrainingError) and issubclass(trackers.TrackerError, ValueError)


def test_old_tensorboard_key_names_the_new_one():
    with pytest.raises(ConfigError, match="'log.tensorboard' is now 'log.backends'"):
        load_config("demo_fmnist", ["log.tensorboard=false"])


def test_a_run_saved_with_the_old_key_still_loads(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("log:\n  tensorboard: false\n")
    with caplog.at_level("INFO", logger="bcssl"):
        cfg = load_config(str(tmp_path / "config.yaml"))
    assert list(cfg.log.backends) == ["csv"] and "'log.tensorboard' is now 'log.backends'" in caplog.text
