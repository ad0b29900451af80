"""Linear probe, the DINO protocol (PAPER.md section 4; facebookresearch/dino ``eval_linear.py``).

Frozen eval-mode backbone, ONE ``nn.Linear(D, num_classes)`` on its pooled features (DINO's
``LinearClassifier``: weight ~ N(0, 0.01), bias 0), cross-entropy, SGD with momentum 0.9 and no
weight decay, lr = ``linear.lr`` (0.001) x batch / 256, cosine-annealed to 0 over the epochs
(``CosineAnnealingLR(T_max=epochs, eta_min=0)``, stepped once per epoch), 100 epochs, batch 256.

* ``linear.augment=false`` (default): the backbone sees each image once, with the evaluation
  preprocessing, and its features are cached per checkpoint (``<run_dir>/cache``); the layer is
  then trained on the in-memory feature tensor, shuffled each epoch by a seeded generator.
* ``linear.augment=true``: DINO's training transform for the probe (RandomResizedCrop, scale
  0.08-1, + horizontal flip), batched on the device, through the frozen backbone every step.

Reported: top-1/top-5 on ``data.eval_split`` after the last epoch (DINO prints the best accuracy
seen over its periodic evaluations, which selects on the evaluation set; we do not).

``linear.normalize_features=true`` standardises each feature with the training mean/std (a
BatchNorm without affine, as MAE's probe); the statistics are folded into the saved layer, so
:func:`load_linear_classifier` always applies to the backbone's raw features.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bcssl.engine.amp import autocast as amp_autocast
from bcssl.engine.run_dir import write_json
from bcssl.engine.runtime import load_run
from bcssl.eval.features import run_features

LINEAR_WEIGHTS = "linear.safetensors"
LINEAR_JSON = "linear.json"


# --------------------------------------------------------------------------------------------
# The recipe's pieces
# --------------------------------------------------------------------------------------------


def make_classifier(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """DINO's ``LinearClassifier`` init: weight ~ N(0, 0.01), bias 0 (reproducible from ``seed``)."""
    layer = nn.Linear(dim, num_classes)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        layer.bias.zero_()
    return layer


def scaled_lr(lr: float, batch_size: int) -> float:
    """DINO's eval_linear: ``lr * global batch / 256``."""
    return lr * batch_size / 256.0


def cosine_epoch_lrs(lr: float, epochs: int) -> list[float]:
    """The lr of each epoch under ``CosineAnnealingLR(T_max=epochs, eta_min=0)``: starts at ``lr``,
    ends at ``lr * (1 + cos(pi (E-1)/E)) / 2`` (a step before 0)."""
    return [0.5 * lr * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]


def feature_stats(features: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and 1/sqrt(var + eps) of (N, D) features (BatchNorm1d without affine)."""
    n = features.shape[0]
    if n == 0:
        raise ValueError("no features to compute statistics of")
    s = torch.zeros(features.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(s)
    for i in range(0, n, 65536):  # chunks: a float64 copy of ImageNet's features would not fit
        f = features[i:i + 65536].double()
        s += f.sum(0)
        sq += f.square().sum(0)
    mean = s / n
    var = (sq / n - mean.square()).clamp_min(0)
    return mean.float(), (var + eps).rsqrt().float()


@torch.no_grad()
def fold_normalization(layer: nn.Linear, mean: torch.Tensor, inv_std: torch.Tensor) -> nn.Linear:
    """``W ((x - mean) * inv_std) + b == (W * inv_std) x + (b - (W * inv_std) mean)``: one layer on raw x."""
    out = nn.Linear(layer.in_features, layer.out_features)
    w = layer.weight.detach().cpu().double() * inv_std.double()
    out.weight.copy_(w.float())
    out.bias.copy_((layer.bias.detach().cpu().double() - w @ mean.double()).float())
    return out


@torch.no_grad()
def topk_accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, *,
                  device: torch.device | str = "cpu", chunk: int = 65536) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``classifier`` on (N, D) features."""
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    n = labels.shape[0]
    if n == 0:
        raise ValueError("no evaluation features")
    hit1 = hit5 = 0
    for s in range(0, n, chunk):
        logits = classifier(features[s:s + chunk].to(device, torch.float32))
        y = labels[s:s + chunk].to(device).long().view(-1, 1)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 += int(top[:, :1].eq(y).sum())
        hit5 += int(top.eq(y).any(1).sum())
    return 100.0 * hit1 / n, 100.0 * hit5 / n


def _fit(layer: nn.Linear, epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
         steps_per_epoch: int, *, epochs: int, lr: float, momentum: float, weight_decay: float,
         device: torch.device, norm: tuple[torch.Tensor, torch.Tensor] | None, progress: bool,
         desc: str) -> tuple[list[float], list[float]]:
    """SGD on ``layer`` over ``epoch_batches(epoch)`` of (features, labels) on ``device``;
    returns the lr and the mean loss of each epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    layer.to(device).train()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if norm is not None:
        mean, inv_std = (t.to(device) for t in norm)
    lrs = cosine_epoch_lrs(lr, epochs)
    losses: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = lrs[epoch]
        total = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        for x, y in epoch_batches(epoch):
            if norm is not None:
                x = (x - mean) * inv_std
            loss = F.cross_entropy(layer(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * y.shape[0]
            seen += y.shape[0]
        epoch_loss = float(total) / max(seen, 1)  # one device sync per epoch
        if not math.isfinite(epoch_loss):
            raise ValueError(f"the linear probe's loss became {epoch_loss} in epoch {epoch + 1}; lower linear.lr")
        losses.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}", lr=f"{lrs[epoch]:.2e}", refresh=False)
    bar.close()
    layer.eval()
    return lrs, losses


def _finish(layer, norm, test_f, test_y, device, lrs, losses, t0) -> dict:
    train_s = time.perf_counter() - t0
    layer = layer.cpu()
    if norm is not None:
        layer = fold_normalization(layer, *norm)
    top1, top5 = topk_accuracy(layer, test_f, test_y, device=device)
    return {"classifier": layer.cpu().eval(), "top1": top1, "top5": top5, "lrs": lrs, "losses": losses,
            "train_s": train_s}


def train_linear(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.001, batch_size: int = 256, *,
                 momentum: float = 0.9, weight_decay: float = 0.0, normalize: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "linear probe") -> dict:
    """Train the probe on precomputed features (the fast path) and evaluate it.

    ``lr`` is the rate at a batch of 256 (scaled by ``batch_size / 256``). The whole training
    feature tensor is moved to ``device`` once; each epoch is a ``randperm`` from a generator
    seeded with ``(seed, epoch)``; the last batch may be smaller (no drop_last, as DINO).

    Returns ``classifier`` (``nn.Linear`` on raw features, CPU), ``top1``/``top5`` (percent, on
    ``test_f``), ``lrs`` and ``losses`` per epoch, ``train_s``.
    """
    if train_f.ndim != 2 or train_f.shape[0] != train_y.shape[0] or test_f.shape[0] != test_y.shape[0]:
        raise ValueError(f"need (N, D) features with N labels; got {tuple(train_f.shape)} / {tuple(train_y.shape)}, "
                         f"{tuple(test_f.shape)} / {tuple(test_y.shape)}")
    if test_f.shape[1] != train_f.shape[1]:
        raise ValueError(f"train features have dim {train_f.shape[1]}, test {test_f.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    t0 = time.perf_counter()
    n, dim = train_f.shape
    x_all = train_f.to(device, torch.float32)
    y_all = train_y.to(device).long()
    norm = feature_stats(train_f) if normalize else None

    def epoch_batches(epoch: int):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield x_all.index_select(0, idx), y_all.index_select(0, idx)

    layer = make_classifier(dim, num_classes, seed)
    lrs, losses = _fit(layer, epoch_batches, math.ceil(n / batch_size), epochs=epochs,
                       lr=scaled_lr(lr, batch_size), momentum=momentum, weight_decay=weight_decay, device=device,
                       norm=norm, progress=progress, desc=desc)
    return _finish(layer, norm, test_f, test_y, device, lrs, losses, t0)


# --------------------------------------------------------------------------------------------
# Augmented training (ImageNet recipe): images -> random resized crop + flip -> frozen backbone
# --------------------------------------------------------------------------------------------


class LinearEvalAugment:
    """DINO's probe training transform, batched: RandomResizedCrop(size, scale, ratio 3/4-4/3)
    + RandomHorizontalFlip + Normalize, on uint8 (B, C, H, W) -> float (B, 3, size, size).

    The crop boxes are drawn as torchvision does (by ``MultiCrop.sample_params``) from ``seed``;
    the resampling is the multi-crop's bicubic ``grid_sample`` (torchvision's default here is
    bilinear)."""

    def __init__(self, size: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        from bcssl.data.multicrop import MultiCrop, MultiCropConfig

        self.size = int(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._sampler = MultiCrop(MultiCropConfig(
            global_size=self.size, local_size=self.size, n_local=0, global_scale=tuple(scale),
            ratio=tuple(ratio), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
            solarize_p=(0.0, 0.0, 0.0), mean=self.mean, std=self.std))

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        from bcssl.data.multicrop import resized_crop

        p = self._sampler.sample_params(images.shape[0], seed, image_size=tuple(images.shape[-2:]))
        x = resized_crop(images.float().div_(255), p["box"][:, 0], p["flip"][:, 0], self.size)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s


def train_linear_augmented(backbone: nn.Module, loader, augment: Callable[[torch.Tensor, int], torch.Tensor],
                           test_f: torch.Tensor, test_y: torch.Tensor, num_classes: int, epochs: int = 100,
                           lr: float = 0.001, *, momentum: float = 0.9, weight_decay: float = 0.0,
                           norm: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                           device: torch.device | str = "cpu", amp: str = "none", channels_last: bool = False,
                           progress: bool = False, desc: str = "linear probe (augmented)") -> dict:
    """Train the probe with ``augment(images, seed)`` applied to every uint8 batch of
    ``loader`` (a shuffling :class:`~bcssl.data.BatchLoader`) and the frozen eval-mode
    ``backbone`` run on the result each step. ``lr`` is at batch 256 (scaled by the loader's
    batch size); ``norm`` = (mean, 1/std) standardises the features. Returns as :func:`train_linear`."""
    from bcssl.engine.runtime import step_seed

    device = torch.device(device)
    t0 = time.perf_counter()
    was_training = backbone.training
    backbone.eval()
    autocast = amp_autocast(amp, device)
    steps = len(loader)

    def epoch_batches(epoch: int):
        for i, (images, y) in enumerate(loader.epoch(epoch)):
            if images.shape[0] == 0:
                continue
            x = augment(images.to(device, non_blocking=True), step_seed(seed + 2, epoch * steps + i))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast:
                f = backbone(x)
            yield f.float(), y.to(device).long()

    layer = make_classifier(int(test_f.shape[1]), num_classes, seed)
    try:
        lrs, losses = _fit(layer, epoch_batches, steps, epochs=epochs, lr=scaled_lr(lr, loader.global_batch_size),
                           momentum=momentum, weight_decay=weight_decay, device=device, norm=norm,
                           progress=progress, desc=desc)
    finally:
        backbone.train(was_training)
    return _finish(layer, norm, test_f, test_y, device, lrs, losses, t0)


# --------------------------------------------------------------------------------------------
# A run's probe: features -> train -> linear.safetensors / linear.json / metrics.jsonl
# --------------------------------------------------------------------------------------------


def _check_linear_config(lc) -> None:
    from bcssl.config import ConfigError

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(lc.epochs >= 1, f"linear.epochs must be >= 1, got {lc.epochs}")
    need(lc.batch_size >= 1, f"linear.batch_size must be >= 1, got {lc.batch_size}")
    need(lc.lr > 0, f"linear.lr must be > 0, got {lc.lr}")
    need(0 <= lc.momentum < 1, f"linear.momentum must be in [0, 1), got {lc.momentum}")
    need(lc.weight_decay >= 0, f"linear.weight_decay must be >= 0, got {lc.weight_decay}")
    need(len(lc.crop_scale) == 2 and 0 < lc.crop_scale[0] <= lc.crop_scale[1] <= 1,
         f"linear.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(lc.crop_scale)}")
    for k in ("train_limit", "test_limit"):
        need(lc[k] is None or lc[k] > 0, f"linear.{k} must be a positive number of images")


def _last_step(run_dir: Path, fallback: int | None) -> int:
    path = run_dir / "metrics.jsonl"
    step = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                s = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue  # a torn last line of a killed run
            if isinstance(s, int):
                step = s if step is None else max(step, s)
    return step if step is not None else int(fallback or 0)


def _append_metrics(run_dir: Path, record: dict) -> None:
    path = run_dir / "metrics.jsonl"
    prefix = ""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = "" if f.read(1) == b"\n" else "\n"
    with open(path, "a") as f:
        f.write(prefix + json.dumps(record) + "\n")


def save_linear_classifier(layer: nn.Linear, run_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``<run_dir>/linear.safetensors``: ``weight`` (C, D), ``bias`` (C,), written atomically."""
    from safetensors.torch import save_file

    path = Path(run_dir) / LINEAR_WEIGHTS
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tensors = {"weight": layer.weight.detach().cpu().float().contiguous(),
               "bias": layer.bias.detach().cpu().float().contiguous()}
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_linear_classifier(run_dir: str | os.PathLike) -> nn.Linear:
    """The probe trained by :func:`linear_probe` (``nn.Linear(D, C)`` on the eval backbone's raw
    features, CPU, eval mode)."""
    from safetensors.torch import load_file

    path = Path(run_dir) / LINEAR_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `bcssl eval linear {run_dir}` first")
    t = load_file(str(path))
    w, b = t.get("weight"), t.get("bias")
    if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"{path} does not hold a linear classifier (weight (C, D), bias (C,)); "
                         f"rerun `bcssl eval linear {run_dir}`")
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer.eval()


def linear_probe(run_dir: str | os.PathLike, overrides: Sequence[str] = (), device=None,
                 progress: bool = True) -> dict:
    """Train and evaluate the linear probe of a run's eval backbone (``linear.*`` config keys;
    dotlist ``overrides`` apply on top of the run's saved config). Writes ``linear.safetensors``,
    ``linear.json`` and a ``{"kind": "linear"}`` record in ``metrics.jsonl``; returns the
    ``linear.json`` dict (with ``run_dir``)."""
    from bcssl.data import BatchLoader, train_and_eval_sets
    from bcssl.engine.runtime import resolve_device

    t_start = time.perf_counter()
    run = Path(run_dir)
    loaded = load_run(run, overrides)
    cfg = loaded.cfg
    lc, d, c = cfg.linear, cfg.data, cfg.crops
    _check_linear_config(lc)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(str(device) if device is not None else cfg.device)
    backbone = loaded.backbone.to(device).requires_grad_(False)

    sets = train_and_eval_sets(cfg)
    train_set = sets[d.split]
    num_classes = int(train_set.num_classes)
    pin = device.type == "cuda"

    def features(split: str, limit) -> tuple[torch.Tensor, torch.Tensor]:
        return run_features(loaded, split, limit, device=device, cache=lc.cache, progress=progress,
                            dataset=sets[split])

    test_f, test_y = features(d.eval_split, lc.test_limit)
    common = dict(momentum=lc.momentum, weight_decay=lc.weight_decay, seed=cfg.seed, device=device,
                  progress=progress)
    if not lc.augment:
        train_f, train_y = features(d.split, lc.train_limit)
        res = train_linear(train_f, train_y, test_f, test_y, num_classes, lc.epochs, lc.lr, lc.batch_size,
                           normalize=lc.normalize_features, **common)
        n_train = int(train_y.shape[0])
    else:
        norm = feature_stats(features(d.split, lc.train_limit)[0]) if lc.normalize_features else None
        loader = BatchLoader(train_set, lc.batch_size, seed=cfg.seed, shuffle=True, drop_last=False,
                             workers=d.workers, pin_memory=pin, limit=lc.train_limit)
        augment = LinearEvalAugment(c.global_size, c.mean, c.std, scale=tuple(lc.crop_scale))
        res = train_linear_augmented(backbone, loader, augment, test_f, test_y, num_classes, lc.epochs, lc.lr,
                                     norm=norm, amp=cfg.train.amp, channels_last=cfg.train.channels_last, **common)
        n_train = loader.num_items

    layer = res["classifier"]
    result = {
        "run_dir": str(run), "linear_top1": res["top1"], "linear_top5": res["top5"], "epochs": int(lc.epochs),
        "lr": scaled_lr(lc.lr, lc.batch_size), "base_lr": float(lc.lr), "batch_size": int(lc.batch_size),
        "momentum": float(lc.momentum), "weight_decay": float(lc.weight_decay), "augment": bool(lc.augment),
        "normalize_features": bool(lc.normalize_features), "num_classes": num_classes,
        "feature_dim": int(layer.in_features), "dataset": d.name, "train_images": n_train,
        "eval_split": d.eval_split, "eval_images": int(test_y.shape[0]), "final_loss": res["losses"][-1],
        "train_s": res["train_s"], "wall_s": time.perf_counter() - t_start,
        "checkpoint": str(loaded.checkpoint_path), "checkpoint_step": loaded.step,
        "checkpoint_sha256": loaded.checkpoint_sha256, "encoder": loaded.encoder,
    }
    save_linear_classifier(layer, run, {"checkpoint_sha256": loaded.checkpoint_sha256,
                                        "num_classes": num_classes, "feature_dim": layer.in_features})
    write_json(run / LINEAR_JSON, result)
    _append_metrics(run, {"kind": "linear", "step": _last_step(run, loaded.step), "top1": res["top1"],
                          "top5": res["top5"], "epochs": int(lc.epochs), "lr": result["lr"],
                          "augment": bool(lc.augment), "train_s": res["train_s"]})
    return result
