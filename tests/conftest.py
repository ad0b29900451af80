"""Shared fixtures: tiny configs that train in seconds on a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bcssl.config import load_config

TINY_MODEL = ["model.name=bcssl_atto", "model.dims=[8,16,32,64]", "model.depths=[1,1,1,1]",
              "model.stem_stride=2", "model.kernel_size=3", "model.drop_path_rate=0.1"]
TINY_HEAD = ["method.dino.out_dim=64", "method.dino.hidden_dim=32", "method.dino.bottleneck_dim=16"]
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


def randomise(model, seed: int = 0):
    """Move BN statistics/affines, LayerNorm affines, layer scales (``gamma``) and depthwise-conv
    biases far from their init, so that folding, exporting and every block are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, torch.Tensor):
                gamma.copy_(torch.rand(gamma.shape, generator=g) * 0.5 + 0.25)
            conv_dw = getattr(m, "conv_dw", None)
            if isinstance(conv_dw, torch.nn.Conv2d) and conv_dw.bias is not None:
                conv_dw.bias.copy_(torch.randn(conv_dw.bias.shape, generator=g) * 0.1)
    return model


def tiny_config(tmp_path, data_root, *extra):
    # the tiny DINO head only when the method is DINO: another method's keys are a config error
    dino = not any(e.startswith("method.name=") and e != "method.name=dino" for e in extra)
    return load_config(None, [
        f"run.dir={tmp_path / 'runs'}", "run.name=tiny", f"data.root={data_root}", "data.workers=0",
        *TINY_MODEL, *(TINY_HEAD + ["method.dino.warmup_teacher_temp_epochs=1"] if dino else []), *TINY_CROPS,
        "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=1", "train.progress=false",
        "train.channels_last=false", "train.log_every_steps=1", "log.backends=[csv]",
        "eval.knn_every=0", "eval.batch_size=32", "threads=1",
        *extra])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
