"""Deterministic, resumable batches of uint8 images.

The order of an epoch depends only on ``(seed, epoch)`` (never on the rank, the number of
workers or the process's RNG state), so a run can stop anywhere and resume at the exact
step (``BatchLoader.epoch(e, start_step=k)``), and ``world_size`` ranks together see the
same images as one process with a ``world_size`` times larger batch:

    global batch s = order[s * B * W : (s + 1) * B * W]      (B = per-rank batch, W = world size)
    rank r's batch  = r-th of W contiguous chunks of it       (rank 0 first)

Small in-memory sets (:class:`~bcssl.data.datasets.InMemoryImages`) are indexed as one
tensor in the main process; other datasets go through a ``torch.utils.data.DataLoader``
whose collate drops unreadable images (``None`` items), so those batches are just smaller.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageFolderDataset

__all__ = ["steps_per_epoch", "epoch_order", "BatchLoader"]


def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Number of (global) batches of ``batch_size * world_size`` items in one epoch."""
    if batch_size < 1 or world_size < 1 or num_items < 0:
        raise ValueError(
            f"need batch_size >= 1, world_size >= 1, num_items >= 0; got "
            f"{batch_size}, {world_size}, {num_items}"
        )
    g = batch_size * world_size
    return num_items // g if drop_last else math.ceil(num_items / g)


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) into a well-spread 64-bit value that is stable across
    # numpy versions; a plain "seed * K + epoch" would make (seed, epoch + K) == (seed + 1, epoch).
    return int(np.random.SeedSequence([int(seed) % 2**64, int(epoch)]).generate_state(1, np.uint64)[0])


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Item order of ``epoch``: ``torch.randperm`` with a Generator seeded from ``(seed, epoch)``.

    The same on every rank (it depends on nothing else). ``shuffle=False`` gives ``arange``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not shuffle:
        return torch.arange(num_items, dtype=torch.int64)
    g = torch.Generator(device="cpu")
    g.manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_items, generator=g, dtype=torch.int64)


class _Indexed(Dataset):
    """Yields ``(index, item)`` so the collate can tell which file was unreadable."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _DropNoneCollate:
    """Stack ``(image, label)`` items, dropping ``None`` ones; also return the dropped indices.

    A class (not a closure) so it pickles into spawn-started workers.
    """

    def __init__(self, image_shape: tuple[int, ...] | None):
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def __call__(self, batch):
        good = [item for _, item in batch if item is not None]
        bad = torch.tensor([i for i, item in batch if item is None], dtype=torch.int64)
        if good:
            images = torch.stack([img for img, _ in good])
        else:  # every item unreadable (or an empty rank slice): keep the (0, C, H, W) shape
            images = torch.empty((0, *(self.image_shape or ())), dtype=torch.uint8)
        labels = torch.tensor([int(lab) for _, lab in good], dtype=torch.int64)
        return images, labels, bad


class _RawCollate:
    """For datasets that decode on the device: the items unstacked (JPEG bytes differ in length),
    with their dataset indices, the labels and the indices of ``None`` items."""

    def __call__(self, batch):
        good = [(i, item) for i, item in batch if item is not None]
        bad = torch.tensor([i for i, item in batch if item is None], dtype=torch.int64)
        labels = torch.tensor([int(item[1]) for _, item in good], dtype=torch.int64)
        return [i for i, _ in good], [item[0] for _, item in good], labels, bad


class BatchLoader:
    """Deterministic, resumable batches ``(uint8 (B, C, H, W), int64 (B,))`` for one rank.

    Args:
        dataset: items ``(uint8 image (C, H, W), int label)`` or ``None`` for an unreadable
            image. A dataset with tensor attributes ``.images``/``.labels``
            (:class:`~bcssl.data.datasets.InMemoryImages`) is indexed directly.
        batch_size: per process; the global batch is ``batch_size * world_size``.
        seed: with the epoch number, fixes the order (see :func:`epoch_order`).
        shuffle: ``False`` keeps dataset order.
        drop_last: drop the last incomplete global batch (otherwise it is split evenly over
            the ranks, so some may get fewer, possibly zero, items).
        rank, world_size: this process's slice of each global batch.
        workers: DataLoader worker processes (not used for in-memory sets).
        pin_memory: pin batches (only when CUDA is available), so that the training loop's
            ``.to(device, non_blocking=True)`` overlaps the copy.
        limit: use only the first ``limit`` items of the dataset.
        decode_device: where a dataset with ``decode_on_device`` (image folders, config
            ``data.decode_on_device``) has each batch of JPEG bytes decoded (its
            ``decode_batch``); batches then come on that device. Default: the CPU.

    Items that are ``None`` are dropped, so such batches are just smaller (an all-bad batch
    has 0 rows); ``skipped`` counts them and the first one triggers one warning naming it.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        limit: int | None = None,
        decode_device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.workers = int(workers)
        self.pin_memory = bool(pin_memory)
        self.limit = limit
        self.decode_device = torch.device(decode_device if decode_device is not None else "cpu")
        self.decode_on_device = bool(getattr(dataset, "decode_on_device", False))
        self.num_items = len(dataset) if limit is None else min(int(limit), len(dataset))
        self.in_memory = isinstance(getattr(dataset, "images", None), torch.Tensor) and isinstance(
            getattr(dataset, "labels", None), torch.Tensor
        )
        self.skipped = 0
        self._warned = False
        if len(self) == 0:
            # Fail early: an epoch of zero steps would make training silently do nothing.
            raise ValueError(
                f"no batches: {self.num_items} items (dataset {len(dataset)}, limit {limit}) < one "
                f"global batch of {self.global_batch_size} (batch_size {batch_size} x world_size "
                f"{world_size}); lower the batch size or raise the limit"
            )

    @property
    def may_drop_images(self) -> bool:
        """Whether a batch can come out smaller, even empty: files decoded per item can be
        unreadable; in-memory tensors cannot."""
        return not self.in_memory

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch."""
        return steps_per_epoch(self.num_items, self.batch_size, self.world_size, self.drop_last)

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
        """This rank's dataset indices for steps ``start_step..len(self)-1`` of ``epoch``."""
        steps = len(self)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
        order = epoch_order(self.num_items, self.seed, epoch, self.shuffle)
        g = self.global_batch_size
        return [
            torch.tensor_split(order[s * g : (s + 1) * g], self.world_size)[self.rank]
            for s in range(start_step, steps)
        ]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from step ``start_step`` on (exact mid-epoch resume).

        Arguments are checked now; the batches are produced lazily.
        """
        batches = self.batch_indices(epoch, start_step)
        return self._iter_memory(batches) if self.in_memory else self._iter_loader(batches)

    # -- implementations

    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def _iter_memory(self, batches):
        images, labels = self.dataset.images, self.dataset.labels
        pin = self._pin()
        for idx in batches:
            if pin:  # gather straight into pinned memory (one copy, not gather + pin)
                x = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
                torch.index_select(images, 0, idx, out=x)
                y = labels[idx].pin_memory()
            else:
                x, y = images[idx], labels[idx]  # one gather per batch, no per-item Python
            yield x, y

    def _iter_loader(self, batches):
        raw = self.decode_on_device
        loader = DataLoader(
            _Indexed(self.dataset),
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.workers,
            collate_fn=_RawCollate() if raw else _DropNoneCollate(getattr(self.dataset, "image_shape", None)),
            pin_memory=self._pin(),
            persistent_workers=False,
        )
        for batch in loader:
            if raw:
                index, items, y, bad = batch
                x, failed = self.dataset.decode_batch(items, self.decode_device)
                if failed:  # decoded on the device but broken: dropped and counted as well
                    keep = torch.ones(len(items), dtype=torch.bool)
                    keep[failed] = False
                    y = y[keep]
                    bad = torch.cat([bad, torch.tensor([index[k] for k in failed], dtype=torch.int64)])
            else:
                x, y, bad = batch
            if len(bad):
                self._report_skipped(bad.tolist())
            yield x, y

    def _report_skipped(self, bad: list[int]) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"skipping unreadable image {self._describe(bad[0])}; further unreadable images "
                "are dropped without warning and counted in BatchLoader.skipped",
                RuntimeWarning,
                stacklevel=3,
            )
        self.skipped += len(bad)

    def _describe(self, i: int) -> str:
        ds = self.dataset
        if isinstance(ds, ImageFolderDataset):
            # Decode once more (only for the one warning) to say *why* it failed.
            try:
                ds.load(i)
                reason = ""
            except Exception as e:  # any decode error is the answer here
                reason = f" ({type(e).__name__}: {e})"
            return f"{ds.path(i)}{reason}"
        path = getattr(ds, "path", None)
        return str(path(i)) if callable(path) else f"#{i} of {type(ds).__name__}"
