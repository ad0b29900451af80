"""Linear probe, the DINO protocol (facebookresearch/dino ``eval_linear.py``).

Frozen eval-mode backbone, ONE ``nn.Linear(D, num_classes)`` on its ``linear_features`` (DINO's
``LinearClassifier``: weight ~ N(0, 0.01), bias 0; ViT-S/16: the class tokens of the last 4
blocks, 4 x 384 = 1536-d; ResNet / ConvNeXt / Swin / BC-SSL: the pooled features), cross-entropy,
SGD with momentum 0.9 and no weight decay, lr = ``linear.lr`` (0.001) x global batch / 256,
cosine-annealed to 0 over the epochs (``CosineAnnealingLR(T_max=epochs, eta_min=0)``, stepped once
per epoch), 100 epochs. ``linear.protocol``:

* ``dino_eval_linear`` (the default on image folders): DINO's training transform every step
  (RandomResizedCrop(224), scale 0.08-1, of the original image, cut with PIL's bilinear filter in
  the loader workers as torchvision's default does, + horizontal flip + normalise on the device;
  in-memory sets: the same boxes resampled batched on the device),
  the frozen backbone run on it, every torchrun process on its slice of each global batch of
  ``linear.batch_size`` with the layer in DistributedDataParallel; evaluated after every epoch
  (DINO's ``val_freq=1``) on the evaluation split with Resize(256) + CenterCrop(224) -- the
  backbone is frozen and that transform fixed, so its features are extracted once and cached --
  reporting the last epoch (``linear_top1``) and the best one (``best_top1``, what DINO prints,
  selected on the evaluation set). Checkpoints (atomic, ``<run>/linear/checkpoint.pt``) every
  ``linear.checkpoint_every_steps`` and at each epoch end: a killed probe resumes exactly.
* ``cached_features`` (the default on in-memory sets, Fashion-MNIST / CIFAR / STL): the fast
  probe -- the backbone sees each image once, with the evaluation preprocessing, the features are
  cached per checkpoint (``<run_dir>/cache``) and the layer is trained on the feature tensor,
  shuffled each epoch by a seeded generator. On 28 px Fashion-MNIST, 100 augmented epochs
  through the backbone cost hours on a CPU; the presets keep this probe.

``linear.normalize_features=true`` standardises each feature with the training mean/std (a
BatchNorm without affine, as MAE's probe); the statistics are folded into the saved layer, so
:func:`load_linear_classifier` always applies to the backbone's raw linear features.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
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
from bcssl.eval.registry import Evaluation

log = logging.getLogger("bcssl")

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

    def __call__(self, images: torch.Tensor, seed: int, offset: int = 0, global_batch: int | None = None
                 ) -> torch.Tensor:
        """``images`` are items ``offset..`` of a global batch of ``global_batch`` (a torchrun
        process's slice): the boxes are drawn for the global batch, so N processes crop as one."""
        from bcssl.data.multicrop import resized_crop

        b = images.shape[0]
        p = self._sampler.sample_params(global_batch or b, seed, image_size=tuple(images.shape[-2:]))
        if global_batch:
            p = self._sampler.slice_params(p, offset, offset + b)
        x = resized_crop(images.float().div_(255), p["box"][:, 0], p["flip"][:, 0], self.size)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s


@dataclass(frozen=True)
class ProbeCrops:
    """The probe's training crop, for the loader workers of file-backed datasets (as
    ``bcssl.data.crops`` cuts pre-training crops): ONE ``RandomResizedCrop(size, scale)`` of the
    original image with torchvision's default bilinear filter (DINO ``eval_linear.py``:
    ``transforms.RandomResizedCrop(224)``). The flip and normalisation run on the device."""
    global_size: int = 224
    global_scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    n_global: int = 1
    resample: str = "bilinear"
    local_size: int = 224
    local_scale: tuple = (0.08, 1.0)
    n_local: int = 0


def _flip_normalise(images: torch.Tensor, positions: torch.Tensor, seed: int, global_batch: int, mean, std
                    ) -> torch.Tensor:
    """uint8 crops (b, 3, S, S) -> float, each mirrored with p = 0.5 (drawn per position in the global
    batch from ``seed``: 1 or N processes flip the same images), normalised."""
    flips = torch.rand(global_batch, generator=torch.Generator().manual_seed(seed)) < 0.5
    x = images.float().div_(255)
    x = torch.where(flips[positions].to(x.device)[:, None, None, None], x.flip(-1), x)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


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


def _protocol(cfg) -> str:
    p = cfg.linear.protocol
    if p == "auto":  # augmented DINO protocol where it matters; the fast one on small in-memory sets
        return "dino_eval_linear" if cfg.data.name == "image_folder" else "cached_features"
    return p


def _slice_of(global_n: int, world: int, rank: int) -> tuple[int, int]:
    """Offset and size of rank's slice of a global batch of ``global_n`` (``torch.tensor_split``,
    as :class:`~bcssl.data.BatchLoader` splits it)."""
    sizes = [len(c) for c in torch.tensor_split(torch.arange(global_n), world)]
    return sum(sizes[:rank]), sizes[rank]


def dino_eval_linear(loaded, train_set, test_f: torch.Tensor, test_y: torch.Tensor, num_classes: int, *,
                     dist, device: torch.device, out_dir: Path, norm=None, progress: bool = True) -> dict:
    """DINO's augmented, distributed, per-epoch-evaluated probe (see the module docstring) on
    ``train_set``; ``test_f``/``test_y``: the evaluation split's linear features. Resumes from
    ``out_dir/checkpoint.pt``. Returns :func:`train_linear`'s keys plus ``history`` (one
    ``{"epoch", "loss", "lr", "top1", "top5"}`` per epoch), ``best_top1``/``best_top5``/``best_epoch``."""
    from bcssl.data import BatchLoader, eval_image_size
    from bcssl.engine import checkpoint as ckpt
    from bcssl.engine import distributed as ddp
    from bcssl.engine.runtime import step_seed
    from bcssl.eval.features import linear_features_of

    cfg = loaded.cfg
    lc, d, c = cfg.linear, cfg.data, cfg.crops
    world, rank = dist.world_size, dist.rank
    if lc.batch_size % world:
        raise ValueError(f"linear.batch_size {lc.batch_size} (all processes together) must be a multiple of the "
                         f"{world} processes")
    t0 = time.perf_counter()
    size = eval_image_size(cfg)
    # file-backed sets: crops of the original image cut where it is decoded; in-memory ones: on the device
    from_files = hasattr(train_set, "crop_item")
    loader = BatchLoader(train_set, lc.batch_size // world, seed=cfg.seed, shuffle=True, drop_last=False,
                         workers=d.workers, pin_memory=device.type == "cuda", limit=lc.train_limit,
                         rank=rank, world_size=world,
                         crops=ProbeCrops(size, tuple(lc.crop_scale)) if from_files else None)
    steps, epochs, n_train = len(loader), int(lc.epochs), loader.num_items
    augment = LinearEvalAugment(size, c.mean, c.std, scale=tuple(lc.crop_scale))
    backbone = loaded.backbone.to(device).eval().requires_grad_(False)
    features_of, kind = linear_features_of(backbone)
    autocast = amp_autocast(cfg.train.amp, device)
    dim = int(test_f.shape[1])
    layer = make_classifier(dim, num_classes, cfg.seed).to(device)
    net = (nn.parallel.DistributedDataParallel(layer, device_ids=[device] if device.type == "cuda" else None)
           if dist.enabled else layer)
    base_lr = scaled_lr(lc.lr, lc.batch_size)
    lrs = cosine_epoch_lrs(base_lr, epochs)
    opt = torch.optim.SGD(layer.parameters(), lr=base_lr, momentum=lc.momentum, weight_decay=lc.weight_decay)
    if norm is not None:
        mean, inv_std = (t.to(device) for t in norm)

    # What the checkpoint must agree on to be resumed: the weights probed and the recipe.
    recipe = {"checkpoint_sha256": loaded.checkpoint_sha256, "encoder": loaded.encoder, "features": kind,
              "dim": dim, "num_classes": num_classes, "train_images": n_train, "seed": int(cfg.seed),
              **{k: (list(v) if k == "crop_scale" else v) for k, v in lc.items()
                 if k not in ("cache", "checkpoint_every_steps", "protocol", "test_limit")}}
    ck_path = out_dir / "checkpoint.pt"
    step, history, partial = 0, [], [0.0, 0]
    resume = ckpt.latest(out_dir)
    if resume is not None:
        state = ckpt.load(resume)
        if state.get("recipe") != recipe:
            raise ValueError(f"{ck_path} belongs to another checkpoint or linear.* recipe; remove {out_dir} to "
                             "start the probe over")
        layer.load_state_dict(state["layer"])
        opt.load_state_dict(state["optimizer"])
        step, history, partial = int(state["step"]), list(state["history"]), list(state["partial"])
        log.info("linear probe: resuming at step %d/%d", step, steps * epochs)

    def save(at: int, part) -> None:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save({"layer": layer.state_dict(), "optimizer": opt.state_dict(), "step": at,
                       "history": history, "partial": part, "recipe": recipe}, ck_path)
        ddp.barrier()

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            clf = layer if norm is None else fold_normalization(layer, *norm).to(device)
        return topk_accuracy(clf, test_f, test_y, device=device)

    bar = tqdm(total=steps * epochs, initial=step, desc="linear probe (dino_eval_linear)",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    layer.train()
    for epoch in range(step // steps, epochs):
        for group in opt.param_groups:
            group["lr"] = lrs[epoch]
        first = step - epoch * steps
        # this epoch's loss: the part before a resume (all ranks' sum, kept by rank 0) + this run's
        total = torch.tensor(partial[0] if dist.is_main else 0.0, dtype=torch.float64, device=device)
        seen = torch.tensor(partial[1] if dist.is_main else 0, dtype=torch.float64, device=device)
        for batch in loader.epoch(epoch, start_step=first):
            global_n = min(loader.global_batch_size, loader.num_items - step % steps * loader.global_batch_size)
            offset, _ = _slice_of(global_n, world, rank)
            if from_files:
                images, y = batch.groups[0][:, 0], batch.labels
            else:
                images, y = batch
            y = y.to(device).long()
            if images.shape[0] and from_files:
                x = _flip_normalise(images.to(device, non_blocking=True), batch.positions,
                                    step_seed(cfg.seed + 2, step), global_n, c.mean, c.std)
            elif images.shape[0]:
                x = augment(images.to(device, non_blocking=True), step_seed(cfg.seed + 2, step), offset,
                            global_n if world > 1 else None)
            if images.shape[0]:
                if cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast:
                    f = features_of(x).float()
            else:  # every image of this slice unreadable: still take part in the gradient all-reduce
                f = torch.zeros(0, dim, device=device)
            if norm is not None:
                f = (f - mean) * inv_std
            loss_sum = F.cross_entropy(net(f), y, reduction="sum")
            # the mean over the global batch (DDP averages the ranks' gradients: x world / count)
            count = y.shape[0]
            if dist.enabled:
                count = int(ddp.all_reduce_sum(torch.tensor(float(count), device=device)).item())
            opt.zero_grad(set_to_none=True)
            (loss_sum * (world / max(count, 1))).backward()
            opt.step()
            total += loss_sum.detach().double()
            seen += y.shape[0]
            step += 1
            bar.update(1)
            if lc.checkpoint_every_steps and step % lc.checkpoint_every_steps == 0 and step % steps:
                t, n = ddp.all_reduce_sum(torch.stack([total, seen])).tolist()
                save(step, [t, int(n)])
        t, n = ddp.all_reduce_sum(torch.stack([total, seen])).tolist()
        epoch_loss = t / max(n, 1)
        if not math.isfinite(epoch_loss):
            raise ValueError(f"the linear probe's loss became {epoch_loss} in epoch {epoch + 1}; lower linear.lr")
        top1, top5 = evaluate()
        layer.train()
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "lr": lrs[epoch], "top1": top1, "top5": top5})
        bar.set_postfix(loss=f"{epoch_loss:.4f}", top1=f"{top1:.2f}", refresh=False)
        partial = [0.0, 0]
        save(step, partial)
    bar.close()
    layer.eval()
    best = max(history, key=lambda h: h["top1"])
    final = layer.cpu() if norm is None else fold_normalization(layer, *norm)
    return {"classifier": final.cpu().eval(), "top1": history[-1]["top1"], "top5": history[-1]["top5"],
            "lrs": lrs, "losses": [h["loss"] for h in history], "history": history, "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "train_s": time.perf_counter() - t0,
            "train_images": n_train, "features": kind}


def linear_probe(run_dir: str | os.PathLike, overrides: Sequence[str] = (), device=None,
                 progress: bool = True) -> dict:
    """Train and evaluate the linear probe of a run's eval backbone (``linear.*`` config keys;
    dotlist ``overrides`` apply on top of the run's saved config) with ``linear.protocol``.
    Under torchrun every process takes part. Writes (rank 0) ``linear.safetensors``,
    ``linear.json`` and a ``{"kind": "linear"}`` record in ``metrics.jsonl``; returns the
    ``linear.json`` dict (with ``run_dir``)."""
    from bcssl.data import train_and_eval_sets
    from bcssl.engine import distributed as ddp
    from bcssl.eval.features import linear_features_of

    t_start = time.perf_counter()
    run = Path(run_dir)
    loaded = load_run(run, overrides)
    cfg = loaded.cfg
    lc, d = cfg.linear, cfg.data
    _check_linear_config(lc)
    protocol = _protocol(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with ddp.process_group(str(device) if device is not None else cfg.device) as (dist, device):
        backbone = loaded.backbone.to(device).requires_grad_(False)
        kind = linear_features_of(backbone)[1]
        sets = train_and_eval_sets(cfg)
        train_set = sets[d.split]
        num_classes = int(train_set.num_classes)

        def features(split: str, limit) -> tuple[torch.Tensor, torch.Tensor]:
            return run_features(loaded, split, limit, device=device, cache=lc.cache, progress=progress,
                                dataset=sets[split], features="linear")

        test_f, test_y = features(d.eval_split, lc.test_limit)
        if protocol == "cached_features":
            train_f, train_y = features(d.split, lc.train_limit)
            res = train_linear(train_f, train_y, test_f, test_y, num_classes, lc.epochs, lc.lr, lc.batch_size,
                               momentum=lc.momentum, weight_decay=lc.weight_decay, normalize=lc.normalize_features,
                               seed=cfg.seed, device=device, progress=progress and dist.is_main)
            n_train = int(train_y.shape[0])
        else:
            norm = feature_stats(features(d.split, lc.train_limit)[0]) if lc.normalize_features else None
            res = dino_eval_linear(loaded, train_set, test_f, test_y, num_classes, dist=dist, device=device,
                                   out_dir=run / "linear", norm=norm, progress=progress)
            n_train = res["train_images"]

        layer = res["classifier"]
        result = {
            "run_dir": str(run), "protocol": protocol, "linear_top1": res["top1"], "linear_top5": res["top5"],
            "epochs": int(lc.epochs), "lr": scaled_lr(lc.lr, lc.batch_size), "base_lr": float(lc.lr),
            "batch_size": int(lc.batch_size), "momentum": float(lc.momentum), "weight_decay": float(lc.weight_decay),
            "augment": protocol == "dino_eval_linear", "features": kind,
            "normalize_features": bool(lc.normalize_features), "num_classes": num_classes,
            "feature_dim": int(layer.in_features), "dataset": d.name, "train_images": n_train,
            "eval_split": d.eval_split, "eval_images": int(test_y.shape[0]), "final_loss": res["losses"][-1],
            "processes": dist.world_size, "train_s": res["train_s"], "wall_s": time.perf_counter() - t_start,
            "checkpoint": str(loaded.checkpoint_path), "checkpoint_step": loaded.step,
            "checkpoint_sha256": loaded.checkpoint_sha256, "encoder": loaded.encoder,
        }
        if protocol == "dino_eval_linear":
            result.update(best_top1=res["best_top1"], best_top5=res["best_top5"], best_epoch=res["best_epoch"],
                          crop_scale=list(lc.crop_scale), history=res["history"])
        if dist.is_main:
            save_linear_classifier(layer, run, {"checkpoint_sha256": loaded.checkpoint_sha256, "protocol": protocol,
                                                "num_classes": num_classes, "feature_dim": layer.in_features,
                                                "features": kind})
            write_json(run / LINEAR_JSON, result)
            _append_metrics(run, {"kind": "linear", "step": _last_step(run, loaded.step), "top1": res["top1"],
                                  "top5": res["top5"], "epochs": int(lc.epochs), "lr": result["lr"],
                                  "protocol": protocol, "train_s": res["train_s"]})
        ddp.barrier()
    return result


def _protocol_label(lin: dict) -> str:
    if not lin:
        return "-"
    if lin.get("protocol"):
        return str(lin["protocol"])
    return "augmented (older bcssl)" if lin.get("augment") else "cached_features"  # linear.json before protocols


class Linear(Evaluation):
    name = "linear"
    section = "linear"
    distributed = True
    sweep_metrics = {"linear_top1": ("linear probe top-1 (%)", True)}

    def run(self, run_dir, overrides=(), *, progress: bool = True, **options) -> dict:
        return linear_probe(run_dir, overrides, progress=progress)

    def summary(self, r: dict, run_dir) -> str:
        best = (f"; best {r['best_top1']:.2f}% at epoch {r['best_epoch']}" if r.get("best_top1") is not None else "")
        return (f"linear probe ({r['protocol']}) top-1 {r['linear_top1']:.2f}%, top-5 {r['linear_top5']:.2f}% after "
                f"{r['epochs']} epochs{best} ({r['train_s']:.0f} s); classifier: {Path(run_dir) / LINEAR_WEIGHTS}")

    def report_columns(self, run):
        from bcssl.eval.report import _f, _final_linear

        top1, top5, _ = _final_linear(run)
        lin = run.results.get("linear") or {}
        return [("linear top-1", _f(top1)), ("linear top-5", _f(top5)), ("linear best top-1", _f(lin.get("best_top1"))),
                ("linear protocol", _protocol_label(lin))]

    def report_sources(self, run):
        from bcssl.eval.report import _final_linear

        src = _final_linear(run)[2]
        return [f"linear from {src}"] if src else []

    def sweep_values(self, r: dict) -> dict:
        return {"linear_top1": r["linear_top1"], "linear_top5": r["linear_top5"],
                "linear_protocol": r.get("protocol", "cached_features")}


EVALUATION = Linear()
