"""Reference multi-crop pipeline: DINO's per-image PIL ``DataAugmentationDINO``.

Only the benchmarks use it, as the baseline that ``bcssl.data.multicrop.MultiCrop`` must beat.
It mirrors facebookresearch/dino ``main_dino.DataAugmentationDINO`` (torchvision v1 transforms on
PIL images, ``utils.GaussianBlur`` via ``PIL.ImageFilter`` and ``utils.Solarization`` via
``PIL.ImageOps``), with the crop sizes, scales and probabilities taken from a ``MultiCropConfig``.
"""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from bcssl.data.multicrop import MultiCropConfig


class GaussianBlur:
    """DINO's blur: with probability ``p``, PIL Gaussian blur with radius (sigma) ~ U(lo, hi)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:  # DINO: ``do_it = random.random() <= p``
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class Solarization:
    """DINO's solarize: with probability ``p``, ``ImageOps.solarize`` (threshold 128)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """Per-image PIL multi-crop: ``__call__(pil_image) -> [global1, global2, local1..localN]``."""

    def __init__(self, cfg: MultiCropConfig | None = None):
        cfg = cfg or MultiCropConfig()
        b, c, s, h = cfg.jitter
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=cfg.flip_p),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=cfg.jitter_p
            ),
            transforms.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
        bicubic = transforms.InterpolationMode.BICUBIC
        lo, hi = cfg.blur_sigma

        def crop_pipeline(size, scale, blur_p, solarize_p):
            steps = [
                transforms.RandomResizedCrop(size, scale=scale, ratio=cfg.ratio, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(blur_p, lo, hi),
            ]
            if solarize_p > 0:  # DINO has Solarization on global2 only
                steps.append(Solarization(solarize_p))
            return transforms.Compose(steps + [normalize])

        self.global_transfo1 = crop_pipeline(cfg.global_size, cfg.global_scale, cfg.blur_p[0], cfg.solarize_p[0])
        self.global_transfo2 = crop_pipeline(cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p[1])
        self.local_crops_number = cfg.n_local
        self.local_transfo = crop_pipeline(cfg.local_size, cfg.local_scale, cfg.blur_p[2], cfg.solarize_p[2])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


def collate(per_image: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Stack per-image crop lists into per-crop batches, as a DataLoader's default collate does."""
    return [torch.stack(views) for views in zip(*per_image)]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (B, C, H, W) -> list of RGB PIL images (what an ImageFolder dataset yields)."""
    out = []
    for img in images:
        arr = img.permute(1, 2, 0).contiguous().numpy()
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        out.append(pil.convert("RGB"))
    return out
