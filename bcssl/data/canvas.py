"""Fashion-MNIST canvases: items placed at random positions and scales on a larger black canvas.

On Fashion-MNIST's own 28 px images a 5x5 kernel already covers every stage map from the second
stage on, so the kernel size has no room to matter. On a canvas the item is somewhere in a larger
field, at one of many sizes, and a network has to gather evidence over an extent that depends on
where and how large the item is: the situation the paper's large kernels are for.

Two layouts share the drawing code (:func:`paste_item`):

- :func:`scatter_canvas`: one item per canvas, scaled by a random factor and placed anywhere,
  optionally with clutter (small fragments of other items): the ``fashion_mnist_canvas`` dataset
  (``data.name=fashion_mnist_canvas``), labelled with the item's class for k-NN / linear probes.
- :func:`grid_canvas`: 1-3 items in the cells of a 2 x 2 grid (never overlapping), with each
  item's placement: the COCO-style detection set of ``benchmarks/detection_fmnist.py``.

Canvases are made deterministically from ``(seed, split)``; the same options give the same images.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .datasets import FASHION_MNIST_CLASSES, InMemoryImages, load_fashion_mnist

ITEM = 28  # Fashion-MNIST's side
SPLIT_SEEDS = {"train": 0, "test": 1}  # added to data.canvas.seed: train and test canvases differ


@dataclass(frozen=True)
class Placement:
    """An item drawn on a canvas: source image ``index``, top-left ``(y0, x0)`` and ``side``
    (the item is resized to ``side x side``); ``item`` holds the resized pixels."""
    index: int
    y0: int
    x0: int
    side: int
    item: np.ndarray


def resize_item(image: np.ndarray, side: int) -> np.ndarray:
    """One uint8 (H, W) item resized to ``side x side`` (PIL bicubic, as the detection set was made)."""
    from PIL import Image

    if image.shape == (side, side):
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def paste_item(canvas: np.ndarray, image: np.ndarray, index: int, y0: int, x0: int, side: int) -> Placement:
    """Draw ``image`` resized to ``side`` at ``(y0, x0)``, keeping the brighter pixel where items
    overlap (items are light on black, as in Fashion-MNIST)."""
    item = resize_item(image, side)
    region = canvas[y0:y0 + side, x0:x0 + side]
    np.maximum(region, item, out=region)
    return Placement(index, y0, x0, side, item)


def grid_canvas(rng: np.random.Generator, images: np.ndarray, size: int) -> tuple[np.ndarray, list[Placement]]:
    """A ``size`` px canvas: a 2 x 2 grid of cells, 1-3 of them holding an item scaled by 1-1.5x at
    a random place inside its cell (so items never overlap). ``images``: uint8 (N, 28, 28)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    cell = size // 2
    placed = []
    for c in rng.choice(4, size=rng.integers(1, 4), replace=False):
        k = int(rng.integers(len(images)))
        side = int(ITEM * rng.uniform(1.0, min(1.5, cell / ITEM)))
        y0 = (c // 2) * cell + int(rng.integers(0, cell - side + 1))
        x0 = (c % 2) * cell + int(rng.integers(0, cell - side + 1))
        placed.append(paste_item(canvas, images[k], k, y0, x0, side))
    return canvas, placed


def scatter_canvas(rng: np.random.Generator, images: np.ndarray, index: int, size: int,
                   scale: Sequence[float] = (1.0, 2.0), clutter: int = 0) -> np.ndarray:
    """A ``size`` px canvas with item ``index`` scaled by a factor drawn from ``scale`` (of 28 px;
    capped so it fits) at a uniformly random position, and ``clutter`` fragments of other items
    (a random 7-14 px square cut from a random image; overlaps keep the brighter pixel)."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    for _ in range(clutter):
        k = int(rng.integers(len(images)))
        side = int(rng.integers(7, 15))
        y, x = (int(v) for v in rng.integers(0, ITEM - side + 1, size=2))
        fragment = np.ascontiguousarray(images[k, y:y + side, x:x + side])
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        paste_item(canvas, fragment, k, y0, x0, side)
    lo, hi = (min(float(s), size / ITEM) for s in scale)
    side = int(round(ITEM * rng.uniform(lo, hi)))
    y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    paste_item(canvas, images[index], index, y0, x0, side)
    return canvas


@functools.lru_cache(maxsize=4)  # the trainer and each evaluator of one process load the same split
def _canvases(root, split: str, size: int, scale: tuple[float, float], clutter: int, seed: int):
    source = load_fashion_mnist(root, split=split)
    images = source.images[:, 0].numpy()
    rng = np.random.default_rng([int(seed), SPLIT_SEEDS[split]])
    out = np.stack([scatter_canvas(rng, images, i, size, scale, clutter) for i in range(len(images))])
    return torch.from_numpy(out).unsqueeze(1), source.labels


def load_fashion_mnist_canvas(root=None, split: str = "train", *, size: int = 64,
                              scale: Sequence[float] = (1.0, 2.0), clutter: int = 0, seed: int = 0) -> InMemoryImages:
    """Every Fashion-MNIST image of ``split`` on its own ``size`` px canvas (label = its class).

    ``scale``: the range of the item's side relative to 28 px (1-2: 28-56 px); ``clutter``: item
    fragments scattered around it; ``seed``: which canvases (train and test differ for any seed).
    ``root`` / ``split`` as :func:`~bcssl.data.datasets.load_fashion_mnist`.
    """
    split = "test" if str(split).lower() == "val" else str(split).lower()
    if split not in SPLIT_SEEDS:
        raise ValueError(f"fashion_mnist_canvas: unknown split {split!r}; valid splits: train, test")
    if int(size) < ITEM:
        raise ValueError(f"data.canvas.size must be >= {ITEM} (the items' side), got {size}")
    if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
        raise ValueError(f"data.canvas.scale must be [low, high] with 0 < low <= high, got {list(scale)}")
    if int(clutter) < 0:
        raise ValueError(f"data.canvas.clutter must be >= 0, got {clutter}")
    images, labels = _canvases(None if root is None else str(root), split, int(size),
                               (float(scale[0]), float(scale[1])), int(clutter), int(seed))
    return InMemoryImages(images, labels, FASHION_MNIST_CLASSES)
