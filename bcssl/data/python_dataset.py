"""Pre-train on any map-style dataset of images given in Python (``bcssl.pretrain(cfg, train_set=ds)``).

``ds[i]`` may return an image or ``(image, label, ...)``; the image is a PIL image, a uint8 tensor
``(C, H, W)`` or ``(H, W)``, or a uint8 ndarray ``(H, W, C)`` or ``(H, W)`` (float tensors/arrays
in [0, 1] are scaled to 0-255; 1 or 4 channels become RGB). Each image is treated as an image file
is: its crops are sampled over the whole image with DINO's ``RandomResizedCrop`` geometry and cut
with PIL's bicubic filter in the loader's workers (:mod:`bcssl.data.crops`), seeded per (seed,
step, position in the global batch). Labels are not needed; an item that cannot be read as an image
is one clear error naming its index and what it returned.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .crops import CropItem, make_crop_item

_EXPECTED = ("a PIL image, a uint8 tensor (C, H, W) / (H, W), a uint8 ndarray (H, W, C) / (H, W), "
             "or a tuple (image, label)")


def to_pil_rgb(image: Any, where: str):
    """``image`` (see the module docstring) as an RGB PIL image; ``TypeError`` naming ``where``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # (C, H, W) -> (H, W, C)
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise TypeError(f"{where} returned {type(image).__name__}; expected {_EXPECTED}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or min(arr.shape[:2]) < 1:
        raise TypeError(f"{where} returned an array of shape {tuple(arr.shape)}; expected {_EXPECTED}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{where} returned {arr.dtype} pixels; expected uint8, or floats in [0, 1]")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


class PythonImages(Dataset):
    """A user's dataset as bcssl's loader reads image files (``crop_item``: one image's crops).

    Item 0 is read once here, so that a dataset of the wrong kind fails before training starts.
    Workers (``data.workers`` > 0) receive a pickled copy of the dataset, as with any PyTorch
    ``DataLoader``; a dataset that cannot be pickled needs ``data.workers=0``.
    """

    def __init__(self, dataset: Dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"train_set must be a map-style dataset (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("train_set is empty")
        self.dataset = dataset
        self.name = type(dataset).__name__
        self._image_and_label(0)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labelled(self) -> bool:
        return False  # evaluations read the run config's data.* sets

    @property
    def num_classes(self) -> int:
        return 0

    def _image_and_label(self, i: int):
        item = self.dataset[i]
        where = f"train_set[{i}] ({self.name})"
        label = -1
        if isinstance(item, (tuple, list)):
            if not item:
                raise TypeError(f"{where} returned an empty {type(item).__name__}; expected {_EXPECTED}")
            if len(item) > 1 and (isinstance(item[1], (int, np.integer)) or (
                    isinstance(item[1], torch.Tensor) and item[1].numel() == 1)):
                label = int(item[1])
            item = item[0]
        return to_pil_rgb(item, where), label

    def crop_item(self, i: int, seed: int, cfg) -> CropItem:
        """Item ``i``'s pre-training crops (as ``ImageFolderDataset.crop_item``)."""
        img, label = self._image_and_label(i)
        return make_crop_item(img, img.size, seed, cfg, label)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self._image_and_label(i)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous(), label

    def __repr__(self) -> str:
        return f"PythonImages({self.name}, {len(self)} items)"
