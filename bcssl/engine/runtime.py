"""What training and every evaluation share: errors, device resolution, per-step seeds, the
optimiser's parameter groups, building a method from a config and loading a run.

Nothing here trains or evaluates; ``engine/trainer.py``, ``bcssl/eval/*``, ``export.py`` and the demo
import from here (and never from each other) for these.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from bcssl.engine import checkpoint as ckpt
from bcssl.engine.run_dir import load_run_config

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from bcssl.methods import SSLMethod


class TrainingError(RuntimeError):
    """Training or evaluation cannot go on (e.g. the loss stayed non-finite, CUDA is missing); the
    message says why and what to change."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``device`` of a config (``auto``, ``cpu``, ``cuda``, ``cuda:N``) -> a ``torch.device``.

    ``auto`` is CUDA when available, else the CPU. A bare ``cuda`` becomes ``cuda:LOCAL_RANK``
    (one GPU per torchrun process). CUDA asked for but missing is a :class:`TrainingError`.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device '{name}' requested but CUDA is not available; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (Linux), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def step_seed(seed: int, step: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, global step)."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2 ** 63 - 1)


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weights only; biases and 1-D params (norms, layer scale,
    weight-norm magnitude) get none, as in DINO's ``get_params_groups``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_method(cfg: DictConfig) -> SSLMethod:
    """The method (``method.name``) with its backbone (``model.*``), freshly initialised."""
    from bcssl.methods import create_method  # late: methods import the engine's collectives

    return create_method(cfg.method.name, cfg.model, cfg.method)


# --------------------------------------------------------------------------------------------
# Loading a run: config, checkpoint and eval backbone
# --------------------------------------------------------------------------------------------

_HASH_CHUNK = 1 << 22


def _sha256_of_open_file(f) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints can be GBs)."""
    with open(path, "rb") as f:
        return _sha256_of_open_file(f)


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


@dataclass
class LoadedRun:
    """A run's resolved config and eval backbone (CPU, eval mode) with the checkpoint it came from.

    ``checkpoint_sha256`` is the digest of exactly the bytes the weights were loaded from, even
    when a training process replaces the checkpoint meanwhile; pass it to :func:`cached_features`.
    """
    cfg: DictConfig
    backbone: nn.Module
    checkpoint_path: Path
    checkpoint_sha256: str
    step: int | None
    encoder: str = "teacher"  # which network ``backbone`` is (eval.encoder, resolved)


def _load_checkpoint_consistently(path: Path, retries: int = 5) -> tuple[dict, Path, str]:
    """``(state, file loaded, sha256 of that file)``.

    ``checkpoint.load_with_source`` falls back to ``<name>.prev.pt`` when the latest file is
    unreadable and says which file it used. The trainer replaces checkpoints atomically
    (new inode), so the digest belongs to the loaded weights when the file's inode, size and
    mtime are the same before loading and while hashing; otherwise a save raced us: retry.
    """
    prev = ckpt.prev_path(path)
    for _ in range(retries):
        before = {}
        for p in (path, prev):
            try:
                before[p] = _stat_key(os.stat(p))
            except FileNotFoundError:
                pass
        state, used = ckpt.load_with_source(path)
        try:
            with open(used, "rb") as f:
                now = _stat_key(os.fstat(f.fileno()))
                digest = _sha256_of_open_file(f)
        except FileNotFoundError:
            continue
        if before.get(used) == now:
            return state, used, digest
    raise RuntimeError(f"checkpoint {path} kept changing while it was loaded ({retries} tries); "
                       "evaluate once the training process has written it")


def load_run(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> LoadedRun:
    """Config (+ dotlist ``overrides``) and latest checkpoint of a run -> its eval backbone.

    Raises FileNotFoundError when ``run_dir`` is not a run directory or has no checkpoint.
    """
    run = Path(run_dir)
    cfg = load_run_config(run, overrides)
    path = ckpt.latest(run)
    if path is None:
        raise FileNotFoundError(f"{run} has no checkpoint.pt to evaluate; train it first with `bcssl pretrain`")
    state, used, digest = _load_checkpoint_consistently(path)
    if "method" not in state:
        raise FileNotFoundError(f"{used} is not a bcssl pre-training checkpoint (no 'method' state)")
    method = build_method(cfg)
    method.load_state_dict(state["method"])
    encoder = method.resolve_eval_encoder(cfg.eval.encoder)
    backbone = method.eval_backbone(encoder).eval()
    step = state.get("step")
    return LoadedRun(cfg, backbone, used, digest, int(step) if step is not None else None, encoder)


def load_run_backbone(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[DictConfig, nn.Module, Path]:
    """``(cfg, eval backbone in eval mode on the CPU, checkpoint path)`` of a run (see :func:`load_run`)."""
    r = load_run(run_dir, overrides)
    return r.cfg, r.backbone, r.checkpoint_path
