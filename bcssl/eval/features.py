"""Feature extraction shared by every evaluator: eval-mode backbone, batched, with the standard
evaluation preprocessing (DINO: resize 256 -> centre-crop 224; small images are resized up to
the training crop size).

Features are cached per run under ``<run_dir>/cache/`` keyed by the checkpoint's bytes, the
images and the preprocessing (:func:`cached_features`); ``bcssl.engine.runtime.load_run`` gives a
run's eval backbone together with the digest of the checkpoint it was loaded from."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from bcssl.engine.amp import autocast as amp_autocast
from bcssl.engine.runtime import LoadedRun, file_sha256


def eval_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B,C,H,W) -> normalised float (B,3,size,size).

    Inputs larger than ``size`` are centre-cropped to ``size`` (ImageFolder images are loaded
    at ``load_size`` = 256 for 224 crops, which is DINO's Resize(256)+CenterCrop(224)); smaller
    inputs (28x28 Fashion-MNIST) are resized up bicubically, as the training crops were.
    """
    x = images.float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top:top + size, left:left + size]
    else:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                     size: int, mean, std, device: torch.device | str = "cpu", amp: str = "none",
                     channels_last: bool = False, total: int | None = None, desc: str = "features",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` in eval mode over uint8 ``(images, labels)`` batches; returns float32
    features (N, D) and labels (N,) on the CPU. The backbone's train/eval mode is restored."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    autocast = amp_autocast(amp, device)
    try:
        for images, y in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            x = eval_preprocess(images.to(device, non_blocking=True), size, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                f = backbone(x)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Caching a run's features per (checkpoint bytes, data, transform)
# --------------------------------------------------------------------------------------------

def _short(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def feature_cache_path(run_dir: str | os.PathLike, checkpoint_sha: str, dataset_key: str,
                       transform_key: str) -> Path:
    """``<run_dir>/cache/features-<data/transform hash>-<checkpoint+data+transform hash>.pt``: the
    first part names the (dataset, transform) so a new checkpoint's file replaces the old one."""
    return (Path(run_dir) / "cache" /
            f"features-{_short(dataset_key, transform_key)}-{_short(checkpoint_sha, dataset_key, transform_key)}.pt")


def cached_features(run_dir: str | os.PathLike, checkpoint_path: str | os.PathLike, backbone: nn.Module,
                    dataset_key: str, transform_key: str, batches_fn: Callable[[], Iterable], *,
                    checkpoint_sha256: str | None = None, **extract_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of ``backbone`` over ``batches_fn()``, cached on disk.

    The cache key hashes the checkpoint file's bytes (pass ``checkpoint_sha256`` from
    :func:`load_run` to tie it to the exact weights loaded; otherwise ``checkpoint_path`` is
    hashed now), ``dataset_key`` and ``transform_key`` (strings naming the images and the
    preprocessing; the caller makes them distinct). A hit loads the features without calling
    ``batches_fn`` or the backbone. A miss extracts them, removes the files of older checkpoints
    for the same dataset/transform, and writes atomically (temporary file + rename).
    """
    digest = checkpoint_sha256 or file_sha256(checkpoint_path)
    path = feature_cache_path(run_dir, digest, dataset_key, transform_key)
    meta = {"checkpoint_sha256": digest, "dataset_key": dataset_key, "transform_key": transform_key}
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if all(blob.get(k) == v for k, v in meta.items()) and blob["features"].shape[0] == blob["labels"].shape[0]:
                return blob["features"], blob["labels"]
            warnings.warn(f"feature cache {path} does not match its key; recomputing", stacklevel=2)
        except Exception as e:  # a truncated or foreign file is just a miss
            warnings.warn(f"feature cache {path} is unreadable ({type(e).__name__}); recomputing", stacklevel=2)
    feats, labels = extract_features(backbone, batches_fn(), **extract_kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"features-{_short(dataset_key, transform_key)}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"features": feats.contiguous(), "labels": labels.contiguous(), **meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk must not lose the features just computed
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the feature cache {path}: {e}", stacklevel=2)
    return feats, labels


def run_features(loaded: LoadedRun, split: str, limit: int | None = None, *, device: torch.device | str = "cpu",
                 cache: bool = True, progress: bool = True, dataset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a run's eval backbone on ``split`` of its dataset (first ``limit`` images), with
    the evaluation preprocessing at the run's global crop size. Cached under ``<run>/cache`` per
    checkpoint, so k-NN and the linear probe of one checkpoint extract each split once.
    ``dataset``: the already built split, to avoid loading it again."""
    from bcssl.data import BatchLoader, dataset_from_config

    cfg = loaded.cfg
    d, c = cfg.data, cfg.crops
    device = torch.device(device)
    ds = dataset if dataset is not None else dataset_from_config(d, split)
    loader = BatchLoader(ds, cfg.eval.batch_size, shuffle=False, drop_last=False, workers=d.workers,
                         pin_memory=device.type == "cuda", limit=limit)
    kw = dict(size=c.global_size, mean=tuple(c.mean), std=tuple(c.std), device=device, amp=cfg.train.amp,
              channels_last=cfg.train.channels_last, progress=progress, total=len(loader),
              desc=f"{split} features")
    backbone = loaded.backbone.to(device)
    if not cache:
        return extract_features(backbone, loader.epoch(0), **kw)
    dataset_key = json.dumps({"name": d.name, "root": str(d.root), "split": split, "load_size": d.load_size,
                              "limit": limit, "len": len(ds), "classes": int(ds.num_classes),
                              **({"canvas": OmegaConf.to_container(d.canvas)} if d.name == "fashion_mnist_canvas" else {})})
    transform_key = json.dumps({"eval_preprocess": c.global_size, "mean": list(c.mean), "std": list(c.std),
                                "amp": cfg.train.amp, "encoder": loaded.encoder})
    return cached_features(Path(loaded.checkpoint_path).parent, loaded.checkpoint_path,
                           backbone, dataset_key, transform_key, lambda: loader.epoch(0),
                           checkpoint_sha256=loaded.checkpoint_sha256, **kw)
