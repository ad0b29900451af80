"""train.compile: the student's backbone and head compiled in place give the same run.

The CPU test uses the ``aot_eager`` backend (train.compile_backend): dynamo capture and AOTAutograd
without code generation, seconds instead of the ~1 min a cold inductor C++ build takes on a small
CPU. The default backend (inductor) is what a GPU run uses; benchmarks/train_throughput.py times it.
"""
from __future__ import annotations

import json

import torch

from bcssl.engine import checkpoint as ckpt
from bcssl.engine.trainer import train
from tests.conftest import tiny_config


def _run(tmp_path, data_root, *extra):
    cfg = tiny_config(tmp_path, data_root, "train.epochs=1", "data.limit=32", "eval.final_knn=false", *extra)
    res = train(cfg)  # 32 images / batch 16: 2 steps
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    return res, losses, ckpt.load(tmp_path / "runs" / "tiny" / "checkpoint.pt")["method"]


def test_compiled_student_gives_the_same_losses_and_checkpoint(tmp_path, tiny_fmnist):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plain, plain_losses, plain_state = _run(tmp_path / "plain", tiny_fmnist)
    assert counters["stats"]["unique_graphs"] == 0
    compiled, losses, state = _run(tmp_path / "compiled", tiny_fmnist, "train.compile=true",
                                   "train.compile_backend=aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 3  # backbone at 2 crop sizes + head: the student really ran compiled
    assert len(losses) == len(plain_losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), atol=1e-4, rtol=1e-4)
    assert state.keys() == plain_state.keys()  # compiled in place: no "_orig_mod." in the keys
    for k in plain_state:
        torch.testing.assert_close(state[k].float(), plain_state[k].float(), atol=1e-4, rtol=1e-4)
    assert compiled.images_seen == plain.images_seen == 32
