"""Run identity: a run folder resumes only under the config it was started with (``--resume-changed``
lets a few keys change)."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from bcssl.config import ConfigError
from bcssl.engine import checkpoint as ckpt
from bcssl.engine.run_dir import check_resume_config, config_changes, load_run_config
from bcssl.engine.trainer import train
from tests.conftest import tiny_config

FAST = ("train.epochs=1", "data.limit=32", "eval.final_knn=false", "train.checkpoint_every_steps=0")


def test_changed_kernel_size_is_refused_naming_the_key(tmp_path, tiny_fmnist):
    train(tiny_config(tmp_path, tiny_fmnist, *FAST))
    run_dir = tmp_path / "runs" / "tiny"
    started = (run_dir / "config.yaml").read_text()
    changed = tiny_config(tmp_path, tiny_fmnist, *FAST, "model.kernel_size=5")
    with pytest.raises(ConfigError) as e:
        train(changed)
    msg = str(e.value)
    assert "model.kernel_size (3 -> 5)" in msg and "run.name=" in msg and "\n" not in msg
    assert "differing keys: model.kernel_size (3 -> 5). Start a new run" in msg  # only the keys that differ
    with pytest.raises(ConfigError, match=r"--resume-changed only allows .*model.kernel_size \(3 -> 5\)"):
        train(changed, resume_changed=True)  # not a key a run may change
    assert (run_dir / "config.yaml").read_text() == started and ckpt.load(run_dir / "checkpoint.pt")["step"] == 2


def test_more_epochs_needs_resume_changed_then_continues(tmp_path, tiny_fmnist):
    train(tiny_config(tmp_path, tiny_fmnist, *FAST))
    run_dir = tmp_path / "runs" / "tiny"
    longer = tiny_config(tmp_path, tiny_fmnist, *FAST, "train.epochs=2", "log.backends=[tensorboard,csv]")
    with pytest.raises(ConfigError, match=r'log.backends \(\["csv"\] -> \["tensorboard", "csv"\]\), train.epochs \(1 -> 2\).*'
                                          r"Add --resume-changed to continue"):
        train(longer)
    out = train(longer, resume_changed=True)
    assert ckpt.load(run_dir / "checkpoint.pt")["step"] == 4 and out.images_seen == 64
    assert load_run_config(run_dir).train.epochs == 2  # config.yaml is now the config it continues with
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in records if r["kind"] == "config"] == [{"log.backends": [["csv"], ["tensorboard", "csv"]],
                                                                          "train.epochs": [1, 2]}]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    train(longer)  # the same command again: nothing differs now (and nothing is left to train)


def test_where_and_how_fast_a_run_goes_are_not_compared(tmp_path, tiny_fmnist):
    a = tiny_config(tmp_path, tiny_fmnist, *FAST)
    b = tiny_config(tmp_path, tiny_fmnist, *FAST, "device=cpu", "threads=2", "data.workers=3", "train.progress=true",
                    f"run.dir={tmp_path / 'moved'}")
    assert config_changes(a, b) == {}
    c = OmegaConf.merge(a, {"seed": 1, "crops": {"n_local": 4}})
    assert config_changes(a, c) == {"crops.n_local": (2, 4), "seed": (0, 1)}
    assert check_resume_config("run", c, started=c) == {}
