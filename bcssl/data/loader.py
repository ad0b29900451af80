"""Deterministic, resumable batches of uint8 images.

The order of an epoch depends only on ``(seed, epoch)`` (never on the rank, the number of
workers or the process's RNG state), so a run can stop anywhere and resume at the exact
step (``BatchLoader.epoch(e, start_step=k)``), and ``world_size`` ranks together see the
same images as one process with a ``world_size`` times larger batch:

    global batch s = order[s * B * W : (s + 1) * B * W]      (B = per-rank batch, W = world size)
    rank r's batch  = r-th of W contiguous chunks of it       (rank 0 first)

Small in-memory sets (:class:`~bcssl.data.datasets.InMemoryImages`) are indexed as one
tensor in the main process; other datasets go through a ``torch.utils.data.DataLoader``
whose collate drops unreadable images, so those batches are just smaller.

Given a multi-crop config (``crops=``), a dataset of files (one with ``crop_item``) yields
:class:`CropBatch` es instead: each image's crops cut from the original image in the workers, its
boxes seeded by (seed, global step, its position in the global batch)
(:func:`~bcssl.data.crops.crop_seed`), and those positions, so that the device-side photometric
parameters are drawn per position too: any number of processes makes the same crops, and an
unreadable file changes nothing for the other images of its batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .crops import CropItem, Unreadable, crop_boxes, crop_groups, crop_seed, device_crops

__all__ = ["steps_per_epoch", "epoch_order", "BatchLoader", "CropBatch"]

log = logging.getLogger("bcssl")


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


def _bad(item) -> bool:
    return item is None or isinstance(item, Unreadable)


@dataclass
class CropBatch:
    """A batch of pre-training crops cut from the original images (see :mod:`bcssl.data.crops`).

    ``groups``: uint8 ``(b, k, 3, S, S)`` per crop group (the 2 globals, then the locals);
    ``positions``: int64 ``(b,)``, each image's position in the global batch (the photometric
    parameters are drawn per position: ``MultiCrop.from_crops``); ``boxes``: int64 ``(b, K, 4)``
    (top, left, height, width) in the original image's pixels; ``sizes``: int64 ``(b, 2)`` its
    (width, height). ``b`` is smaller than the batch size when files were unreadable.
    ``views``: the finished crops (``MultiCrop.from_crops``) when the loader made them
    (:class:`WorkerPhotometric`), else None.
    """
    groups: list
    labels: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    sizes: torch.Tensor
    views: list | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device, non_blocking: bool = False) -> "CropBatch":
        def move(ts):
            return None if ts is None else [t.to(device, non_blocking=non_blocking) for t in ts]
        return CropBatch(move(self.groups), self.labels, self.positions, self.boxes, self.sizes, move(self.views))

    def pin_memory(self) -> "CropBatch":  # DataLoader(pin_memory=True) calls this on custom batches
        return CropBatch([g.pin_memory() for g in self.groups], self.labels, self.positions, self.boxes, self.sizes,
                         None if self.views is None else [v.pin_memory() for v in self.views])

    @classmethod
    def stack(cls, items: list[CropItem], positions: list[int], cfg) -> "CropBatch":
        if items:
            groups = [torch.stack([it.groups[g] for it in items]) for g in range(len(items[0].groups))]
            boxes = torch.stack([it.boxes for it in items])
        else:  # every item unreadable (or an empty rank slice): keep the shapes
            groups = [torch.empty((0, k, 3, s, s), dtype=torch.uint8) for s, k, _ in crop_groups(cfg)]
            boxes = torch.empty((0, sum(k for _, k, _ in crop_groups(cfg)), 4), dtype=torch.int64)
        return cls(groups, torch.tensor([it.label for it in items], dtype=torch.int64),
                   torch.tensor(positions, dtype=torch.int64), boxes,
                   torch.tensor([it.size for it in items], dtype=torch.int64).view(-1, 2))


class _Indexed(Dataset):
    """Yields ``(index, item)`` so the collate can tell which file was unreadable."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _DropBadCollate:
    """Stack ``(image, label)`` items, dropping unreadable ones; also return those ``(index, item)``.

    A class (not a closure) so it pickles into spawn-started workers.
    """

    def __init__(self, image_shape: tuple[int, ...] | None):
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def __call__(self, batch):
        good = [item for _, item in batch if not _bad(item)]
        bad = [(i, item) for i, item in batch if _bad(item)]
        if good:
            images = torch.stack([img for img, _ in good])
        else:  # every item unreadable (or an empty rank slice): keep the (0, C, H, W) shape
            images = torch.empty((0, *(self.image_shape or ())), dtype=torch.uint8)
        labels = torch.tensor([int(lab) for _, lab in good], dtype=torch.int64)
        return images, labels, bad


class _Cropping(Dataset):
    """Keys ``(index, position, global step)`` -> ``(index, crop seed, position, step, item)``: the
    item is the dataset's :meth:`crop_item` (crops cut in this worker) or, for device decoding, its
    :meth:`read`. The crop seed (:func:`~bcssl.data.crops.crop_seed` of the loader's seed, the step
    and the position) is computed here, in the workers, not for a whole epoch up front."""

    def __init__(self, dataset, cfg, raw: bool, seed: int):
        self.dataset, self.cfg, self.raw, self.seed = dataset, cfg, raw, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        i, pos, step = key
        seed = crop_seed(self.seed, step, pos)
        item = self.dataset.read(i) if self.raw else self.dataset.crop_item(i, seed, self.cfg)
        return i, seed, pos, step, item


class WorkerPhotometric:
    """The photometric part of the multi-crop (``MultiCrop.from_crops``), run by the loader on
    each batch it collates: for training on the CPU with loader workers, where the workers are
    CPU cores that run beside the training step (on a GPU it is the device's job).

    ``seed_of_step(global step)``: the step's augmentation seed (the trainer's); ``global_batch``:
    the global batch size the parameters are drawn for. Picklable (it goes to the workers).
    """

    def __init__(self, cfg, seed_of_step, global_batch: int):
        self.cfg, self.seed_of_step, self.global_batch = cfg, seed_of_step, int(global_batch)
        self._multicrop = None

    def __getstate__(self):
        return {**self.__dict__, "_multicrop": None}

    def __call__(self, batch: CropBatch, step: int) -> list[torch.Tensor]:
        if self._multicrop is None:
            from .multicrop import MultiCrop

            self._multicrop = MultiCrop(self.cfg)
            self._multicrop.recycle_outputs = False  # the trainer reads the outputs in another process
        return self._multicrop.from_crops(batch.groups, self.seed_of_step(step), batch.positions, self.global_batch)


class _CropCollate:
    """In the worker: stack the crops of the readable items into a :class:`CropBatch` (and, given a
    ``photometric``, finish them); also return the ``(index, item)`` of the unreadable ones."""

    def __init__(self, cfg, photometric: WorkerPhotometric | None = None):
        self.cfg, self.photometric = cfg, photometric

    def __call__(self, batch):
        good = [(pos, item) for _, _, pos, _, item in batch if isinstance(item, CropItem)]
        bad = [(i, item) for i, _, _, _, item in batch if not isinstance(item, CropItem)]
        out = CropBatch.stack([it for _, it in good], [p for p, _ in good], self.cfg)
        if self.photometric is not None and len(out):
            out.views = self.photometric(out, batch[0][3])
        return out, bad


class _RawCollate:
    """For device decoding: the readable items unstacked (JPEG bytes differ in length) as
    ``(index, seed, position, bytes or image)``, and the unreadable ones."""

    def __call__(self, batch):
        good = [(i, seed, pos, item) for i, seed, pos, _, item in batch if not _bad(item)]
        bad = [(i, item) for i, _, _, _, item in batch if _bad(item)]
        return good, bad


class SkipCounter:
    """Counts the unreadable images a loader drops (``skipped``) and names the first in one log line.
    Subclasses set ``dataset``; ``skipped = 0`` and ``_warned = False`` are their starting state."""

    skipped = 0
    _warned = False

    def _report_skipped(self, bad: list) -> None:
        if not bad:
            return
        if not self._warned:
            self._warned = True
            i, item = bad[0]
            what = f"{item.path} ({item.reason})" if isinstance(item, Unreadable) else self._describe(i)
            log.warning("skipping unreadable image %s; further unreadable images are skipped without a message "
                        "and counted", what)
        self.skipped += len(bad)

    def _describe(self, i: int) -> str:
        path = getattr(self.dataset, "path", None)
        return str(path(i)) if callable(path) else f"#{i} of {type(self.dataset).__name__}"


class BatchLoader(SkipCounter):
    """Deterministic, resumable batches ``(uint8 (B, C, H, W), int64 (B,))`` for one rank.

    Args:
        dataset: items ``(uint8 image (C, H, W), int label)``, or
            :class:`~bcssl.data.crops.Unreadable` / ``None`` for an unreadable image. A dataset
            with tensor attributes ``.images``/``.labels``
            (:class:`~bcssl.data.datasets.InMemoryImages`) is indexed directly.
        batch_size: per process; the global batch is ``batch_size * world_size``.
        seed: with the epoch number, fixes the order (see :func:`epoch_order`), and with the
            global step and position, each image's crop boxes.
        shuffle: ``False`` keeps dataset order.
        drop_last: drop the last incomplete global batch (otherwise it is split evenly over
            the ranks, so some may get fewer, possibly zero, items).
        rank, world_size: this process's slice of each global batch.
        workers: DataLoader worker processes (not used for in-memory sets).
        pin_memory: pin batches (only when CUDA is available), so that the training loop's
            ``.to(device, non_blocking=True)`` overlaps the copy.
        limit: use only the first ``limit`` items of the dataset.
        crops: a ``MultiCropConfig``: a dataset of files (with ``crop_item``) then yields
            :class:`CropBatch` es, the crops cut from the original images in the workers
            (:attr:`makes_crops`). In-memory sets ignore it (their crops are made on the device).
        decode_device: with ``crops``, where a dataset with ``decode_on_device`` (config
            ``data.decode_on_device``) has each batch of JPEG bytes decoded and cut into crops
            (batches then come on that device). Default: the CPU.
        photometric: with ``crops`` (and no device decoding), a :class:`WorkerPhotometric` that
            finishes each batch's crops where it is collated (``CropBatch.views``).

    Unreadable items are dropped, so such batches are just smaller (an all-bad batch has 0
    rows); ``skipped`` counts them and the first one is logged (logger ``bcssl``) with its
    path and why.
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
        crops=None,
        decode_device: torch.device | str | None = None,
        photometric: WorkerPhotometric | None = None,
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
        self.crops = crops
        self.photometric = photometric
        self.decode_device = torch.device(decode_device if decode_device is not None else "cpu")
        self.decode_on_device = bool(getattr(dataset, "decode_on_device", False))
        self.num_items = len(dataset) if limit is None else min(int(limit), len(dataset))
        self.in_memory = isinstance(getattr(dataset, "images", None), torch.Tensor) and isinstance(
            getattr(dataset, "labels", None), torch.Tensor
        )
        if len(self) == 0:
            # Fail early: an epoch of zero steps would make training silently do nothing.
            raise ValueError(
                f"no batches: {self.num_items} items (dataset {len(dataset)}, limit {limit}) < one "
                f"global batch of {self.global_batch_size} (batch_size {batch_size} x world_size "
                f"{world_size}); lower the batch size or raise the limit"
            )

    @property
    def makes_crops(self) -> bool:
        """Whether batches are :class:`CropBatch` es (crops cut where the files are decoded)."""
        return self.crops is not None and not self.in_memory and hasattr(self.dataset, "crop_item")

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

    def _slices(self, epoch: int, start_step: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(step in epoch, this rank's dataset indices, their positions in the global batch)``."""
        steps = len(self)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
        order = epoch_order(self.num_items, self.seed, epoch, self.shuffle)
        g = self.global_batch_size
        out = []
        for s in range(start_step, steps):
            batch = order[s * g : (s + 1) * g]
            positions = torch.tensor_split(torch.arange(len(batch)), self.world_size)[self.rank]
            out.append((s, batch[positions], positions))
        return out

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
        """This rank's dataset indices for steps ``start_step..len(self)-1`` of ``epoch``."""
        return [idx for _, idx, _ in self._slices(epoch, start_step)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        """Batches of ``epoch`` from step ``start_step`` on (exact mid-epoch resume):
        ``(images, labels)``, or :class:`CropBatch` es when :attr:`makes_crops`.

        Arguments are checked now; the batches are produced lazily.
        """
        slices = self._slices(epoch, start_step)
        if self.in_memory:
            return self._iter_memory([idx for _, idx, _ in slices])
        if self.makes_crops:
            return self._iter_crops(epoch, slices)
        return self._iter_loader([idx for _, idx, _ in slices])

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

    def _loader(self, dataset, sampler, collate):
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=collate,
                          pin_memory=self._pin(), persistent_workers=False)

    def _iter_loader(self, batches):
        collate = _DropBadCollate(getattr(self.dataset, "image_shape", None))
        for x, y, bad in self._loader(_Indexed(self.dataset), [b.tolist() for b in batches], collate):
            self._report_skipped(bad)
            yield x, y

    def _iter_crops(self, epoch: int, slices):
        raw = self.decode_on_device
        steps = len(self)
        sampler = [[(i, p, epoch * steps + s) for i, p in zip(idx.tolist(), pos.tolist())] for s, idx, pos in slices]
        collate = _RawCollate() if raw else _CropCollate(self.crops, self.photometric)
        for batch, bad in self._loader(_Cropping(self.dataset, self.crops, raw, self.seed), sampler, collate):
            if raw:
                batch, failed = self._device_crops(batch)
                bad = bad + failed
            self._report_skipped(bad)
            yield batch

    def _device_crops(self, items) -> tuple[CropBatch, list]:
        """Decode a batch of :meth:`read` items on ``decode_device`` and cut each image's crops there
        (the boxes the workers would cut: same sampler, same seeds)."""
        decoded = self.dataset.decode_batch([it for _, _, _, it in items], self.decode_device)
        good, bad = [], []
        for (i, seed, pos, _), img in zip(items, decoded):
            if isinstance(img, str):  # decoded on the device but broken: dropped and counted as well
                bad.append((i, Unreadable(self.dataset.path(i), img)))
                continue
            h, w = img.shape[-2:]
            boxes = crop_boxes(seed, w, h, self.crops)
            good.append((pos, CropItem(device_crops(img, boxes, self.crops), torch.tensor(boxes).view(-1, 4),
                                       (w, h), (w, h), int(self.dataset.targets[i]))))
        batch = CropBatch.stack([it for _, it in good], [p for p, _ in good], self.crops)
        if not good:
            batch = batch.to(self.decode_device)
        return batch, bad
