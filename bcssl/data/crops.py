"""Crop geometry where an image file is decoded: DINO's random resized crops of the ORIGINAL image.

DINO (facebookresearch/dino ``main_dino.py``, ``DataAugmentationDINO``) applies torchvision's
``RandomResizedCrop(size, scale, interpolation=BICUBIC)`` to the PIL image the ImageFolder loader
decoded: a box whose area is a fraction in ``scale`` of the whole image and whose aspect ratio is
log-uniform in [3/4, 4/3] (``RandomResizedCrop.get_params``: 10 tries, then a centre crop of the
nearest allowed ratio), cut out and resized with PIL's bicubic filter, which antialiases when it
shrinks. Files differ in size, so this part runs where the file is decoded, in the DataLoader
workers; every crop of a group comes out at the group's size, so the batch stacks, and the
photometric part (flip, colour jitter, grayscale, blur, solarize, normalise) stays batched on the
training device (:meth:`bcssl.data.multicrop.MultiCrop.from_crops`).

Determinism: an image's boxes come from a generator seeded with :func:`crop_seed` of (run seed,
global step, the image's position in the GLOBAL batch), so 1 or N processes, any number of workers,
make the same boxes; the loader hands each item its seed with its index.

With ``data.decode_on_device`` the same boxes (same sampler, same seeds) are cut on the training
device from the batch decoded there (:func:`device_crops`), resized with PyTorch's antialiased
bicubic, which follows PIL's filter (equal up to rounding away from the box edges).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = [
    "N_TRIES",
    "CropItem",
    "Unreadable",
    "crop_seed",
    "sample_box",
    "crop_boxes",
    "crop_groups",
    "draft_pixels",
    "open_rgb",
    "cut_crops",
    "make_crop_item",
    "device_crops",
]

#: torchvision ``RandomResizedCrop.get_params``' attempts before its centre-crop fallback
N_TRIES = 10

#: Decoded images keep at least this many times the pixels per side that the smallest crop
#: needs (see :func:`draft_pixels`): JPEG draft decoding only touches really large files.
DRAFT_MARGIN = 2.0


class Unreadable(NamedTuple):
    """What a dataset returns for a file it could not decode: the loader drops and counts it."""
    path: str
    reason: str


class CropItem(NamedTuple):
    """One image's pre-training crops, as a worker returns them.

    ``groups``: uint8 tensors ``(k, 3, S, S)``, the crops of each run of equal sizes in output
    order (2 globals, then the locals); ``boxes``: int64 ``(K, 4)`` = (top, left, height, width)
    of every crop in the ORIGINAL image's pixels; ``size``: the file's (width, height);
    ``decoded``: the (width, height) it was decoded at (smaller for large JPEGs); ``label``.
    """
    groups: list
    boxes: torch.Tensor
    size: tuple
    decoded: tuple
    label: int


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def crop_seed(seed: int, step: int, position: int) -> int:
    """The seed of one image's crop boxes: (run seed, global step, position in the global batch).

    ``SeedSequence`` spreads the three numbers into a 64-bit value that is stable across numpy
    versions and never collides for nearby triples."""
    ss = np.random.SeedSequence([int(seed) % 2**64, int(step), int(position), 0x63726F70])  # "crop"
    return int(ss.generate_state(1, np.uint64)[0])


def sample_box(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
               ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` in whole pixels: torchvision ``RandomResizedCrop.get_params``.

    Up to 10 tries of an area fraction ~ U(scale) of the whole image and an aspect ratio (w / h)
    log-uniform in ``ratio``, rounded to pixels; the first that fits gets a uniform position.
    Otherwise the whole image cut to the nearest allowed ratio, centred.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(N_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_groups(cfg) -> list[tuple[int, int, tuple]]:
    """``[(size, count, scale)]``: the global crops, then the local ones (a ``MultiCropConfig``: 2
    globals; a config with ``n_global``, e.g. the linear probe's one crop, sets their number)."""
    return [(cfg.global_size, getattr(cfg, "n_global", 2), tuple(cfg.global_scale)),
            (cfg.local_size, cfg.n_local, tuple(cfg.local_scale))]


def crop_boxes(seed: int, width: int, height: int, cfg) -> list[tuple[int, int, int, int]]:
    """Every crop box of one image (the globals, then ``cfg.n_local`` locals), from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_box(rng, width, height, scale, cfg.ratio)
            for _, count, scale in crop_groups(cfg) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def draft_pixels(cfg) -> float:
    """Pixels a decoded image must keep so that JPEG draft decoding never costs a crop resolution.

    The smallest box of a group covers ``scale[0]`` of the area at the extreme ratio, so its
    shorter side is ``sqrt(scale[0] * min(ratio[0], 1 / ratio[1]) * A)``; it must stay >= the
    crop size (times ``DRAFT_MARGIN``) for every group.
    """
    r = min(cfg.ratio[0], 1 / cfg.ratio[1])
    need = [(size * DRAFT_MARGIN) ** 2 / (scale[0] * r) for size, count, scale in crop_groups(cfg) if count]
    return max(need)


def _to_rgb(img):
    """RGB as torchvision's ImageFolder loader (``img.convert("RGB")``), except 16-bit grayscale,
    which PIL would clip to white: scaled to 8 bits first."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike, min_pixels: float | None = None, min_side: int | None = None):
    """Decode ``path`` as an RGB PIL image -> ``(image, (width, height) of the file)``.

    JPEG: libjpeg decodes at 1/2, 1/4 or 1/8 scale (``Image.draft``) when the reduced image still
    has ``min_pixels`` pixels (the crops' need, :func:`draft_pixels`) or a shorter side of
    ``min_side`` (evaluation): huge photos cost a fraction of the time and memory. PIL's warning
    for images above ``Image.MAX_IMAGE_PIXELS`` is silenced (they are decoded reduced when they
    are JPEGs); above twice that PIL refuses them, and the file counts as unreadable.
    Raises on an unreadable file.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        w, h = img.size
        k = 1.0
        if min_pixels is not None:
            k = min(k, math.sqrt(min_pixels / max(w * h, 1)))
        if min_side is not None:
            k = min(k, min_side / max(min(w, h), 1))
        if k < 0.5 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
        return _to_rgb(img), (w, h)


def cut_crops(img, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int], cfg) -> list[torch.Tensor]:
    """The crops of ``img`` (RGB PIL) for ``boxes`` in the file's pixels (``size`` = its (w, h)).

    Each box is cut and resized to its group's size with PIL's bicubic filter (antialiased when it
    shrinks; ``cfg.resample = "bilinear"`` for torchvision's default, which DINO's linear probe
    uses): ``img.crop(box).resize(...)``, exactly torchvision's ``resized_crop`` on a PIL image.
    An image decoded at reduced size (JPEG draft) is resized from the box scaled to its pixels
    (``resize(box=...)``, sub-pixel exact). Returns uint8 ``(k, 3, S, S)`` per crop group.
    """
    from PIL import Image

    resample = Image.Resampling[getattr(cfg, "resample", "bicubic").upper()]
    sx, sy = img.size[0] / size[0], img.size[1] / size[1]
    out, first = [], 0
    for s, count, _ in crop_groups(cfg):
        arr = np.empty((count, s, s, 3), np.uint8)
        for k, (i, j, h, w) in enumerate(boxes[first:first + count]):
            if sx == sy == 1:
                crop = img.crop((j, i, j + w, i + h)).resize((s, s), resample)
            else:
                crop = img.resize((s, s), resample, box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))
            arr[k] = np.asarray(crop)
        out.append(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
        first += count
    return out


def make_crop_item(img, size: tuple[int, int], seed: int, cfg, label: int) -> CropItem:
    """The :class:`CropItem` of ``img`` (RGB PIL, decoded from an image of ``size`` = (w, h), maybe
    reduced): its boxes from ``seed`` (:func:`crop_boxes`) cut by :func:`cut_crops`."""
    boxes = crop_boxes(seed, size[0], size[1], cfg)
    return CropItem(cut_crops(img, boxes, size, cfg), torch.tensor(boxes, dtype=torch.int64).view(-1, 4), size,
                    img.size, label)


def device_crops(img: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], cfg) -> list[torch.Tensor]:
    """:func:`cut_crops` of a decoded uint8 ``(3, H, W)`` image on its device: each box cut and
    resized with ``F.interpolate(bicubic, antialias=True)`` (PyTorch's port of PIL's filter;
    ``cfg.resample`` as in :func:`cut_crops`)."""
    import torch.nn.functional as F

    mode = getattr(cfg, "resample", "bicubic")
    out, first = [], 0
    for s, count, _ in crop_groups(cfg):
        crops = []
        for i, j, h, w in boxes[first:first + count]:
            region = img[None, :, i:i + h, j:j + w].float()
            crops.append(F.interpolate(region, size=(s, s), mode=mode, antialias=True, align_corners=False))
        first += count
        group = torch.cat(crops) if crops else img.new_empty((0, 3, s, s), dtype=torch.float32)
        out.append(group.round_().clamp_(0, 255).to(torch.uint8))
    return out
