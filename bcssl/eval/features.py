"""Feature extraction shared by every evaluator: eval-mode backbone, batched, with the standard
evaluation preprocessing (DINO: resize 256 -> centre-crop 224; small images are resized up to
the training crop size)."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp in ("bf16", "fp16") else contextlib.nullcontext())
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
