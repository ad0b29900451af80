"""Shared fixtures: tiny configs that train in seconds on a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bcssl.config import load_config

TINY_MODEL = ["model.name=bcssl_atto", "model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]",
              "model.stem_stride=2", "model.kernel_size=3", "model.drop_path_rate=0.1"]
TINY_HEAD = ["method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"]
TINY_CROPS = ["crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
              "crops.mean=[0.5,0.5,0.5]", "crops.std=[0.25,0.25,0.25]"]


def write_idx(root, n_train=64, n_test=32, size=28, seed=0):
    """A tiny Fashion-MNIST-shaped IDX dataset whose classes differ in brightness pattern."""
    import gzip

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, y in enumerate(labels):  # a class-dependent bright bar, so features can separate classes
            images[i, 2 * y: 2 * y + 4, :] = 200
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0, 0, 8, 3], np.uint8).tobytes() + np.array([n, size, size], ">i4").tobytes()
                    + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0, 0, 8, 1], np.uint8).tobytes() + np.array([n], ">i4").tobytes() + labels.tobytes())
    return root


@pytest.fixture
def tiny_fmnist(tmp_path):
    return write_idx(tmp_path / "fmnist")


def tiny_config(tmp_path, data_root, *extra):
    return load_config(None, [
        f"run.dir={tmp_path / 'runs'}", "run.name=tiny", f"data.root={data_root}", "data.workers=0",
        *TINY_MODEL, *TINY_HEAD, *TINY_CROPS,
        "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=1", "train.progress=false",
        "train.channels_last=false", "train.log_every_steps=1", "log.tensorboard=false",
        "method.warmup_teacher_temp_epochs=1", "eval.knn_every=0", "eval.batch_size=32", "threads=1",
        *extra])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
