"""The training loop: exact resume after SIGKILL, non-finite steps, optimiser groups, clipping, logs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from bcssl.engine import checkpoint as ckpt
from bcssl.engine.runtime import TrainingError, param_groups
from bcssl.engine.trainer import clip_gradients_per_param, train
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_weights(run_dir):
    return ckpt.load(os.path.join(run_dir, "checkpoint.pt"))["method"]


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path, tiny_fmnist):
    common = ["train.epochs=2", "train.batch_size=4", "train.checkpoint_every_steps=3", "eval.final_knn=false"]
    # 64 images / batch 4 = 16 steps per epoch; checkpoints at 3, 6, 9, ... are all mid-epoch.
    ref = train(tiny_config(tmp_path / "ref", tiny_fmnist, *common))
    ref_state = final_weights(ref.run_dir)

    cfg = tiny_config(tmp_path / "killed", tiny_fmnist, *common)
    cfg_path = tmp_path / "killed.yaml"
    OmegaConf.save(cfg, cfg_path)
    run_dir = tmp_path / "killed" / "runs" / "tiny"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "bcssl", "pretrain", "--config", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    steps_seen = 0
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            steps_seen = max([json.loads(line)["step"] for line in metrics.read_text().splitlines() if line] or [0])
            if steps_seen >= 4:
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = ckpt.load(run_dir / "checkpoint.pt")["step"]
    assert 3 <= resumed_from < 16 and resumed_from % 16, "the kill must land mid-epoch"

    out = train(cfg)  # the same command again resumes
    state = final_weights(out.run_dir)
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.allclose(state[k].float(), ref_state[k].float(), atol=1e-6, rtol=0), k
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 32  # one history, no duplicated steps


def test_run_dir_contents_and_rerun_of_finished_run(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "log.backends=[tensorboard,csv]", "train.epochs=1")
    res = train(cfg)
    run = tmp_path / "runs" / "tiny"
    assert (run / "config.yaml").exists() and (run / "checkpoint.pt").exists()
    assert any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert len(train_recs) == 4 and all(k in train_recs[0] for k in ("loss", "lr", "wd", "imgs_per_s"))
    assert res.images_seen == 64 and res.imgs_per_s > 0
    before = final_weights(res.run_dir)
    again = train(cfg)  # nothing left to do: same weights, no new steps
    assert again.images_seen == 64
    after = final_weights(again.run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_fmnist, monkeypatch):
    from bcssl.methods.dino import DINO

    real_loss = DINO.loss
    calls = {"n": 0}

    def flaky(self, crops, step):
        calls["n"] += 1
        loss, logs = real_loss(self, crops, step)
        return (loss * float("nan") if step in (1, 2) or step >= 5 else loss), logs

    monkeypatch.setattr(DINO, "loss", flaky)
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.max_nonfinite_steps=3", "train.epochs=3")
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        train(cfg)
    records = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "nonfinite"] == [1, 2, 5, 6, 7]


def test_param_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(3, 3, 3))
    decay, no_decay = param_groups(model)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_per_parameter_clipping():
    a, b = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    a.grad, b.grad = torch.full((10,), 10.0), torch.full((10,), 0.01)
    module = torch.nn.Module()
    module.a, module.b = a, b
    clip_gradients_per_param(module, 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)   # clipped on its own
    assert torch.allclose(b.grad, torch.full((10,), 0.01))         # untouched, not scaled with a


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_fmnist):
    res = train(tiny_config(tmp_path, tiny_fmnist, "train.amp=bf16", "train.epochs=1"))
    assert res.images_seen == 64 and res.nonfinite_steps == 0


def test_fp16_on_cpu_is_a_clear_error(tmp_path, tiny_fmnist):
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        train(tiny_config(tmp_path, tiny_fmnist, "train.amp=fp16", "device=cpu"))


def test_collapse_is_warned_and_logged(tmp_path, tiny_fmnist, monkeypatch, caplog):
    from bcssl.methods.dino import DINO

    monkeypatch.setattr(DINO, "collapse_warning", lambda self, logs: "collapse: test")
    with caplog.at_level("WARNING", logger="bcssl"):
        train(tiny_config(tmp_path, tiny_fmnist, "train.epochs=1"))
    assert sum("collapse: test" in r.message for r in caplog.records) == 1  # warned once in the log
    records = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "collapse" for r in records) == 4  # and recorded at every log step


def test_train_steps_ends_the_last_epoch_early_and_schedules_span_it(tmp_path, tiny_fmnist):
    from bcssl.engine.schedules import cosine_schedule

    # 64 images / batch 16 = 4 steps per epoch; 6 steps = one epoch and a half
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.steps=6", "train.epochs=50", "train.warmup_epochs=0",
                      "eval.final_knn=true")
    calls = []
    res = train(cfg, knn_eval=lambda method, epoch: calls.append(method.momentum(5)) or {"top1": 1.0, "top5": 2.0})
    assert res.images_seen == 96 and res.epochs == 2
    records = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    base = cfg.train.lr * 16 / 256
    assert train_recs[-1]["lr"] == pytest.approx(cosine_schedule(5, 6, base, cfg.train.min_lr))  # the end of the cosine
    # the teacher momentum also reaches the end of its cosine at step 6, not at 50 epochs
    assert calls[-1] == pytest.approx(cosine_schedule(5, 6, cfg.method.dino.momentum_teacher, 1.0))
    assert [r["epoch"] for r in records if r["kind"] == "knn"][-1] == pytest.approx(1.5)
    assert ckpt.load(tmp_path / "runs/tiny/checkpoint.pt")["step"] == 6
