"""torchrun DDP on CPU (gloo): 2 processes == 1 process with the same global batch; SyncBatchNorm
on CPU; SIGTERM/SIGUSR1 save a checkpoint and exit 0; `--nproc`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from bcssl.engine import checkpoint as ckpt
from bcssl.engine.trainer import train
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == "train"]


def torchrun(nproc: int, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "bcssl", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("method", [
    # DINO with BN after every depthwise conv (SyncBN), the all-reduced centre, multi-crop slices
    ["method.name=dino", "model.dw_norm=bn+ln", "method.dino.use_bn_in_head=true"],
    # MoCo v3: keys all-gathered across processes, BN in projector/predictor (SyncBN)
    ["method.name=moco_v3", "crops.n_local=0", "method.moco_v3.proj_hidden_dim=32", "method.moco_v3.proj_dim=16",
     "model.dw_norm=bn+ln"],
], ids=["dino", "moco_v3"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_fmnist, method):
    # SGD: AdamW divides each gradient by its running RMS, so parameters whose true gradient is 0
    # (a Linear bias right before a BatchNorm) take lr-sized steps driven by float rounding noise,
    # which differs with the reduction order; SGD compares what DDP is responsible for, the gradients.
    common = ["train.epochs=1", "model.drop_path_rate=0.0", "eval.final_knn=false", "data.limit=48",
              "train.warmup_epochs=0", "train.checkpoint_every_steps=0", "train.optimizer=sgd", "train.lr=0.01",
              *method]
    ref = train(tiny_config(tmp_path / "one", tiny_fmnist, "train.batch_size=16", *common))

    cfg = tiny_config(tmp_path / "two", tiny_fmnist, "train.batch_size=8", *common)
    OmegaConf.save(cfg, tmp_path / "two.yaml")
    proc = torchrun(2, ["pretrain", "--config", str(tmp_path / "two.yaml"), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 2 and out["images_seen"] == ref.images_seen == 48

    one, two = train_losses(ref.run_dir), train_losses(out["run_dir"])
    assert len(one) == len(two) == 3
    # 1e-5 relative: the losses are ~10, and convolutions pick batch-size-dependent kernels, so the
    # first forward already differs in the 7th digit
    assert max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(one, two)) < 1e-5, (one, two)
    s1 = ckpt.load(os.path.join(ref.run_dir, "checkpoint.pt"))["method"]
    s2 = ckpt.load(os.path.join(out["run_dir"], "checkpoint.pt"))["method"]
    assert s1.keys() == s2.keys()  # checkpoints do not depend on the number of processes
    # relative to the tensor's scale where that is above 1 (BN running variances of wide layers)
    diffs = sorted(((s1[k].float() - s2[k].float()).abs().max().item() / max(1.0, s1[k].float().abs().max().item()), k)
                   for k in s1 if s1[k].is_floating_point())
    assert diffs[-1][0] < 1e-5, "\n".join(f"{d:.2e} {k} {s1[k].abs().max().item():.3e} {s1[k.replace('running_mean', 'running_var')].max().item():.3e}" for d, k in diffs[-10:])
    assert any("running_var" in k for k in s1)  # BN statistics were compared too
    # rank 0 alone wrote the run: one metrics record per step, one config
    assert len([1 for r in map(json.loads, open(os.path.join(out["run_dir"], "metrics.jsonl")))
                if r["kind"] == "train"]) == 3


def test_sync_batchnorm_on_cpu_matches_batchnorm_on_the_global_batch(tmp_path):
    """2 gloo processes, each with half the batch, give the single-process BN output, gradients
    and running statistics, and exit cleanly (the deprecated torch.distributed.nn all_reduce it
    used before warned, and about one exit in six aborted in the interpreter's teardown)."""
    script = tmp_path / "sbn.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {REPO!r})
from bcssl.engine.distributed import convert_sync_batchnorm, init_distributed, shutdown_distributed
dist_info, _ = init_distributed("cpu")
torch.manual_seed(0)
x = torch.randn(8, 3, 5, 5) * 3 + 1
bn = torch.nn.BatchNorm2d(3)
ref = torch.nn.BatchNorm2d(3)
xr = x.clone().requires_grad_()
y_ref = ref(xr)
(y_ref * torch.arange(3.).view(1, 3, 1, 1)).sum().backward()
sbn = convert_sync_batchnorm(torch.nn.Sequential(bn), "cpu")
r, w = dist_info.rank, dist_info.world_size
xl = x[r * 4:(r + 1) * 4].clone().requires_grad_()
y = sbn(xl)
(y * torch.arange(3.).view(1, 3, 1, 1)).sum().backward()
err = max((y - y_ref[r * 4:(r + 1) * 4]).abs().max().item(), (xl.grad - xr.grad[r * 4:(r + 1) * 4]).abs().max().item(),
          (sbn[0].running_var - ref.running_var).abs().max().item(),
          (sbn[0].running_mean - ref.running_mean).abs().max().item())
open(os.path.join({str(tmp_path)!r}, f"err{{r}}.txt"), "w").write(str(err))
torch.distributed.barrier()
shutdown_distributed()
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr, proc.stderr[-3000:]
    errs = [float((tmp_path / f"err{r}.txt").read_text()) for r in range(2)]
    assert len(errs) == 2 and max(errs) < 1e-5, errs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_a_checkpoint_and_exits_zero(tmp_path, tiny_fmnist, sig):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=3", "train.batch_size=4", "train.checkpoint_every_steps=0",
                      "eval.final_knn=false")
    OmegaConf.save(cfg, tmp_path / "c.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "bcssl", "pretrain", "--config", str(tmp_path / "c.yaml"), "--json"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = run_dir / "metrics.jsonl"
        if m.exists() and sum(1 for line in m.read_text().splitlines() if '"train"' in line) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-2000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["preempted"] == sig.name
    assert "checkpoint saved" in stderr and "rerun the same command" in stderr
    saved = ckpt.load(run_dir / "checkpoint.pt")["step"]
    assert 3 <= saved < 48 and saved % 16, "mid-epoch: no epoch-end checkpoint, so the signal wrote it"
    # the same command resumes and finishes
    done = train(cfg)
    assert done.preempted is None and ckpt.load(run_dir / "checkpoint.pt")["step"] == 48


def test_nproc_relaunches_under_torchrun(tmp_path, tiny_fmnist, monkeypatch):
    from bcssl.cli import main

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["pretrain", "--nproc", "2", "--config", "demo_fmnist", "train.epochs=1"]) == 0
    cmd = calls[0]
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    i = len(cmd) - 1 - cmd[::-1].index("-m")  # `torchrun ... -m bcssl` (or python -m torch.distributed.run)
    assert cmd[i + 1:] == ["bcssl", "pretrain", "--config", "demo_fmnist", "train.epochs=1"]
    assert main(["pretrain", "--nproc", "0", "--config", "demo_fmnist"]) != 0


def test_a_rank_whose_batch_is_all_unreadable_does_not_hang_the_others(tmp_path):
    """Image folder, 2 processes x batch 2: both files of rank 1's second batch are corrupt, and
    one of rank 0's third. Every rank skips the second step together (a rank skipping alone would
    leave the other waiting in DDP's all-reduce), the run finishes, the skipped files of all ranks
    are counted, and images_seen counts only the images trained on."""
    import numpy as np
    from PIL import Image

    from bcssl.data import BatchLoader, build_dataset

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(16):  # 4 steps of 2 x 2
        path = root / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    ds = build_dataset("image_folder", root, load_size=16)
    bad = BatchLoader(ds, 2, seed=0, rank=1, world_size=2).batch_indices(0)[1]
    one_of_rank0 = BatchLoader(ds, 2, seed=0, rank=0, world_size=2).batch_indices(0)[2][:1]
    for i in bad.tolist() + one_of_rank0.tolist():
        open(ds.path(i), "wb").write(b"not an image")
    cfg = tiny_config(tmp_path, root, "data.name=image_folder", "train.epochs=1",
                      "train.batch_size=2", "train.log_every_steps=1", "train.checkpoint_every_steps=0",
                      "eval.final_knn=false", "eval.knn_every=0")
    OmegaConf.save(cfg, tmp_path / "c.yaml")
    proc = torchrun(2, ["pretrain", "--config", str(tmp_path / "c.yaml"), "--json"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in open(os.path.join(out["run_dir"], "metrics.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 3, 4]  # step 2 (index 1) skipped
    assert [r["skipped_images"] for r in records if r["kind"] == "data"] == [3]
    # Trained on: steps 1, 3 and 4 of 2 x 2 images, less the one dropped from rank 0's third batch.
    assert out["images_seen"] == 3 * 4 - 1
    assert ckpt.load(os.path.join(out["run_dir"], "checkpoint.pt"))["step"] == 4
