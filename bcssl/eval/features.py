"""Feature extraction shared by every evaluator: eval-mode backbone, batched, with the standard
evaluation preprocessing (DINO: resize 256 -> centre-crop 224; small images are resized up to
the training crop size).

Under torchrun (``--nproc N``) :func:`extract_dataset_features` shards a dataset over the
processes: each encodes a contiguous block of whole batches (the batches one process would
make, so every image sees the same batch shape and gives the same bits) and the blocks are
gathered to every process in dataset order, uneven ones included.

Features are cached per run under ``<run_dir>/cache/`` keyed by the checkpoint's bytes, the
images and the preprocessing (:func:`cached_features`); ``bcssl.engine.runtime.load_run`` gives a
run's eval backbone together with the digest of the checkpoint it was loaded from."""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from bcssl.engine import distributed as ddp
from bcssl.engine.amp import autocast as amp_autocast
from bcssl.engine.runtime import LoadedRun, file_sha256


def eval_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B,C,H,W) -> normalised float (B,3,size,size).

    Inputs larger than ``size`` are centre-cropped to ``size`` (image folders' evaluation items are
    already DINO's Resize(256)+CenterCrop(224) of the original, at ``size``); smaller
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
                     progress: bool = True, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` in eval mode over uint8 ``(images, labels)`` batches; returns float32
    features (N, D) and labels (N,) on the CPU. The backbone's train/eval mode is restored.
    ``forward``: what to compute from the preprocessed batch (default ``backbone`` itself; the
    linear probe passes ``backbone.linear_features``). No readable image is a ValueError, or empty
    tensors with ``allow_empty`` (one process's shard: the others may have some)."""
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
                f = (forward or backbone)(x)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        if allow_empty:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def linear_features_of(backbone: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(function, kind)``: the features a linear probe reads (the backbone contract's
    ``linear_features``: ViT the class tokens of its last 4 blocks, the others the pooled
    features) and a name for them (``linear_features_kind``, "pooled" when they are the forward's)."""
    fn = getattr(backbone, "linear_features", None)
    if fn is None:  # a backbone from outside the registry (an exported file): its forward
        return backbone, "pooled"
    return fn, str(getattr(backbone, "linear_features_kind", "pooled"))


class DatasetRows(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset`` (a process's shard, a robustness subset). An in-memory
    set stays one ``images`` / ``labels`` tensor (a contiguous range is a view, not a copy), so
    :class:`~bcssl.data.BatchLoader` still indexes it in one gather per batch."""

    def __init__(self, dataset, indices: Sequence[int] | range):
        self.dataset = dataset
        self.indices = indices if isinstance(indices, range) else list(indices)
        self.num_classes = dataset.num_classes
        self.classes = getattr(dataset, "classes", None)
        self.image_shape = getattr(dataset, "image_shape", None)
        images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
        if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
            r = self.indices
            sel = slice(r.start, r.stop, r.step) if isinstance(r, range) else torch.as_tensor(r, dtype=torch.long)
            self.images, self.labels = images[sel], labels[sel]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def path(self, i: int) -> str:
        path = getattr(self.dataset, "path", None)
        return str(path(self.indices[i])) if callable(path) else f"#{self.indices[i]}"


def shard_range(num_items: int, batch_size: int, rank: int, world_size: int) -> range:
    """The items process ``rank`` of ``world_size`` encodes: a contiguous block of whole batches
    (block sizes differ by at most one batch; a process may get none)."""
    batches = math.ceil(num_items / batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return range(min(first * batch_size, num_items), min(last * batch_size, num_items))


def extract_dataset_features(backbone: nn.Module, dataset, *, batch_size: int, limit: int | None = None,
                             workers: int = 0, desc: str = "features", progress: bool = True,
                             **extract_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` over the first ``limit`` items of ``dataset`` (in order, batches
    of ``batch_size``), sharded over the processes of a torchrun job and gathered to all of them
    (:func:`shard_range`, :func:`bcssl.engine.distributed.all_gather_uneven`). One process reads
    everything itself; N processes return the same tensors. Unreadable images are dropped."""
    from bcssl.data import BatchLoader  # late: keep `import bcssl.eval.features` light

    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n == 0:
        raise ValueError("no images to extract features from")
    rank, world = ddp.rank(), ddp.world_size()
    shard = shard_range(n, batch_size, rank, world) if world > 1 else range(n)
    feats, labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    if len(shard):
        part = dataset if shard == range(len(dataset)) else DatasetRows(dataset, shard)
        device = torch.device(extract_kw.get("device", "cpu"))
        loader = BatchLoader(part, batch_size, shuffle=False, drop_last=False, workers=workers,
                             pin_memory=device.type == "cuda")
        feats, labels = extract_features(backbone, loader.epoch(0), total=len(loader), desc=desc,
                                         progress=progress and rank == 0, allow_empty=world > 1, **extract_kw)
    if world > 1:
        feats, labels = ddp.all_gather_uneven(feats), ddp.all_gather_uneven(labels)
        if feats.numel() == 0:
            raise ValueError("no images to extract features from")
    return feats, labels


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
    return cached(run_dir, checkpoint_sha256 or file_sha256(checkpoint_path), dataset_key, transform_key,
                  lambda: extract_features(backbone, batches_fn(), **extract_kw))


def cached(run_dir: str | os.PathLike, checkpoint_sha256: str, dataset_key: str, transform_key: str,
           compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], *,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()``'s (features, labels), cached under ``run_dir/cache`` by (checkpoint digest,
    dataset key, transform key) (see :func:`cached_features`). Under torchrun every process
    reads the cache, all use it only if all found it (``compute`` may be collective), and rank
    0 writes it."""
    digest = checkpoint_sha256
    path = feature_cache_path(run_dir, digest, dataset_key, transform_key)
    meta = {"checkpoint_sha256": digest, "dataset_key": dataset_key, "transform_key": transform_key}
    hit = None
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if all(blob.get(k) == v for k, v in meta.items()) and blob["features"].shape[0] == blob["labels"].shape[0]:
                hit = blob["features"], blob["labels"]
            else:
                warnings.warn(f"feature cache {path} does not match its key; recomputing", stacklevel=2)
        except Exception as e:  # a truncated or foreign file is just a miss
            warnings.warn(f"feature cache {path} is unreadable ({type(e).__name__}); recomputing", stacklevel=2)
    if not ddp.any_process([hit is None], torch.device(device))[0]:
        return hit
    feats, labels = compute()
    if ddp.rank() == 0:
        _write_cache(path, digest, dataset_key, transform_key, feats, labels, meta)
    return feats, labels


def _write_cache(path: Path, digest, dataset_key, transform_key, feats, labels, meta) -> None:
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
        warnings.warn(f"could not write the feature cache {path}: {e}", stacklevel=3)


def run_features(loaded: LoadedRun, split: str, limit: int | None = None, *, device: torch.device | str = "cpu",
                 cache: bool = True, progress: bool = True, dataset=None,
                 features: str = "pooled") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a run's eval backbone on ``split`` of its dataset (first ``limit`` images), with
    the evaluation preprocessing at ``bcssl.data.eval_image_size``; sharded over the processes of a
    torchrun job. Cached under ``<run>/cache`` per checkpoint, so k-NN and the linear probe of one
    checkpoint extract each split once. ``dataset``: the already built split, to avoid loading it
    again. ``features``: ``pooled`` (the backbone's forward) or ``linear`` (its ``linear_features``)."""
    from bcssl.data import dataset_from_config, eval_image_size

    cfg = loaded.cfg
    d, c = cfg.data, cfg.crops
    device = torch.device(device)
    ds = dataset if dataset is not None else dataset_from_config(cfg, split)
    backbone = loaded.backbone.to(device)
    forward, kind = linear_features_of(backbone) if features == "linear" else (backbone, "pooled")
    kw = dict(size=eval_image_size(cfg), mean=tuple(c.mean), std=tuple(c.std), device=device, amp=cfg.train.amp,
              channels_last=cfg.train.channels_last, progress=progress, desc=f"{split} features", forward=forward)

    def compute():
        return extract_dataset_features(backbone, ds, batch_size=cfg.eval.batch_size, limit=limit,
                                        workers=d.workers, **kw)
    if not cache:
        return compute()
    dataset_key = json.dumps({"name": d.name, "root": str(getattr(ds, "root", d.root)), "split": split,
                              "preprocess": getattr(ds, "eval_transform", None),
                              "limit": limit, "len": len(ds), "classes": int(ds.num_classes),
                              **({"canvas": OmegaConf.to_container(d.canvas)}
                                 if d.name == "fashion_mnist_canvas" else {})})
    transform = {"eval_preprocess": kw["size"], "mean": list(c.mean), "std": list(c.std),
                 "amp": cfg.train.amp, "encoder": loaded.encoder}
    if kind != "pooled":  # the k-NN's pooled features and a CNN's linear features are the same file
        transform["features"] = kind
    return cached(Path(loaded.checkpoint_path).parent, loaded.checkpoint_sha256, dataset_key,
                  json.dumps(transform), compute, device=device)
