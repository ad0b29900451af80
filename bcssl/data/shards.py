"""Pre-training from tar shards (``data.name=webdataset``): the WebDataset layout large clusters
store ImageNet in, read with the ``webdataset`` package.

A shard is a tar file whose members are grouped by key: ``<key>.jpg`` (or ``.jpeg``, ``.png``,
``.webp``, ...) is the image, an optional ``<key>.cls`` its integer label. ``data.urls`` names the
shards with brace patterns (``/data/imagenet/train-{000000..001023}.tar``; several patterns
separated by spaces, any URL ``webdataset`` opens, e.g. ``pipe:aws s3 cp s3://b/x.tar -``).

How an epoch streams (:class:`ShardLoader`):

- the shard list is permuted per epoch from ``(seed, epoch)``; process ``r`` of ``R`` takes shards
  ``r, r + R, ...`` of it and loader worker ``w`` of ``W`` every ``W``-th of those (so a set needs
  at least ``R x W`` shards; fewer is an error naming both numbers);
- each worker reads its shards in turn, shuffles samples in a buffer of ``data.shuffle_buffer``
  seeded from ``(seed, epoch, rank, worker)``, and starts over (reshuffled) when its shards run out;
- an epoch is ``data.num_samples // global batch`` steps on every process, whatever the shard sizes,
  so the processes stay in step; batch ``k`` of an epoch comes from worker ``k mod W`` (PyTorch's
  in-order round robin), and every image's crops are seeded by ``(seed, global step, position in
  the global batch)``, as for image files.

Resume: the checkpoint's step is the stream position. The stream of a worker is a pure function of
``(seed, epoch, rank, worker, R, W)``, so a resumed run re-reads (without decoding) the samples
each worker had consumed in the interrupted epoch and continues exactly, batch for batch, as long
as ``R`` (processes) and ``W`` (``data.workers``) are the same as before. With another number of
processes or workers it continues from the same step with a different stream (the same shards in
the epoch's order, but not the same batches). An epoch is not a permutation of
the set: a worker whose shards are smaller than its share repeats some samples and one whose shards
are larger leaves some for the next pass, as with ``webdataset``'s ``with_epoch``. Unreadable images
are dropped from their batch and counted like unreadable files.
"""
from __future__ import annotations

import io
import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .crops import CropItem, Unreadable, crop_seed, draft_pixels, make_crop_item, open_rgb
from .datasets import _DECODE_ERRORS, _reason
from .loader import CropBatch, SkipCounter, WorkerPhotometric, _CropCollate, _epoch_seed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
_INSTALL = "pip install 'bcssl[webdataset]' (or pip install webdataset)"


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError(f"data.name=webdataset needs the webdataset package: {_INSTALL}") from None
    return webdataset


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """``"a-{000..002}.tar b.tar"`` (or a list of such) -> every shard URL, in order."""
    from braceexpand import braceexpand

    parts = urls.split() if isinstance(urls, str) else [str(u) for u in urls]
    out = [u for p in parts for u in braceexpand(p)]
    if not out:
        raise ValueError("data.urls names no shard; give e.g. data.urls='/data/train-{000000..000127}.tar'")
    return out


class TarShards:
    """The shards of ``data.urls`` and the number of samples an epoch counts (``data.num_samples``,
    or counted once by reading every shard's member names when the shards are local files)."""

    labelled = False  # evaluations read eval.data.root (a labelled image folder)

    def __init__(self, urls: str | Sequence[str], num_samples: int | None = None, shuffle_buffer: int = 1000):
        self.urls = expand_urls(urls)
        self.shuffle_buffer = int(shuffle_buffer)
        self.num_samples = int(num_samples) if num_samples else self._count()

    def _count(self) -> int:
        import os
        import tarfile

        remote = [u for u in self.urls if not os.path.isfile(u)]
        if remote:
            raise ValueError(f"data.num_samples is needed for shards that are not local files (e.g. {remote[0]}): "
                             "the number of samples in the whole set, which fixes the steps of an epoch")
        keys = 0
        for u in self.urls:
            with tarfile.open(u) as tar:
                keys += len({m.name.rsplit(".", 1)[0] for m in tar.getmembers()
                             if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS})
        return keys

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"TarShards({len(self.urls)} shards, {self.num_samples} samples)"


def _image_of(sample: dict) -> tuple[bytes, str, int]:
    """``(image bytes, its member name, label or -1)`` of a webdataset sample."""
    key = sample.get("__key__", "?")
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            cls = sample.get("cls")
            label = int(cls.decode().strip()) if isinstance(cls, (bytes, bytearray)) and cls.strip() else -1
            return sample[ext], f"{sample.get('__url__', '?')}:{key}.{ext}", label
    raise KeyError(f"{sample.get('__url__', '?')}: sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")


class _ShardStream(IterableDataset):
    """One rank's batches of one epoch from ``start_step`` on; run in each loader worker."""

    def __init__(self, shards: TarShards, batch_size: int, seed: int, epoch: int, start_step: int, steps: int,
                 rank: int, world_size: int, crops, photometric: WorkerPhotometric | None):
        self.shards, self.batch_size, self.seed, self.epoch = shards, batch_size, seed, epoch
        self.start_step, self.steps, self.rank, self.world_size = start_step, steps, rank, world_size
        self.crops, self.collate = crops, _CropCollate(crops, photometric)

    def _samples(self, urls: list[str], worker: int) -> Iterator[dict]:
        """This worker's endless, seeded stream of raw samples (passes over its shards, reshuffled)."""
        wds = _webdataset()
        for rnd in range(1 << 30):
            rng = random.Random(_epoch_seed(self.seed, self.epoch) * 1000003 + (self.rank * 1009 + worker) * 31 + rnd)
            order = list(urls)
            rng.shuffle(order)
            raw = wds.tarfile_samples(iter([{"url": u} for u in order]))
            yield from wds.filters._shuffle(raw, bufsize=self.shards.shuffle_buffer,
                                            initial=min(100, self.shards.shuffle_buffer), rng=rng)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn starting with worker 0, and stream w
        # makes the steps s = w mod W: from start_step on, worker 0 must be stream start_step mod W.
        worker = (worker + self.start_step) % workers
        order = torch.randperm(len(self.shards.urls), generator=torch.Generator().manual_seed(
            _epoch_seed(self.seed, self.epoch))).tolist()
        mine = [self.shards.urls[i] for i in order[self.rank::self.world_size][worker::workers]]
        stream = self._samples(mine, worker)
        b = self.batch_size
        steps = range(worker, self.steps, workers)
        done = len(range(worker, self.start_step, workers))  # this stream's steps before the resume
        for _ in range(b * done):
            next(stream)
        for step in steps[done:]:
            global_step = self.epoch * self.steps + step
            batch = []  # (index in batch, crop seed, position in the global batch, global step, item)
            for j in range(b):
                pos = self.rank * b + j
                seed = crop_seed(self.seed, global_step, pos)
                batch.append((j, seed, pos, global_step, self._item(next(stream), seed)))
            yield self.collate(batch)

    def _item(self, sample: dict, seed: int) -> CropItem | Unreadable:
        try:
            data, name, label = _image_of(sample)
        except KeyError as e:  # a sample without an image member
            return Unreadable(str(sample.get("__url__", "?")), str(e.args[0]))
        try:  # a broken image is counted and dropped, as a broken file
            img, size = open_rgb(io.BytesIO(data), min_pixels=draft_pixels(self.crops))
            return make_crop_item(img, size, seed, self.crops, label)
        except _DECODE_ERRORS as e:
            return Unreadable(name, _reason(e))


class ShardLoader(SkipCounter):
    """:class:`~bcssl.data.loader.BatchLoader`'s interface over :class:`TarShards` (see the module
    docstring): ``len()`` steps per epoch, ``epoch(epoch, start_step)`` yields :class:`CropBatch` es."""

    makes_crops = True
    may_drop_images = True
    in_memory = False

    def __init__(self, shards: TarShards, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, crops=None, photometric: WorkerPhotometric | None = None, pin_memory: bool = False,
                 limit: int | None = None):
        _webdataset()
        if crops is None:
            raise ValueError("ShardLoader needs the multi-crop config (crops=...)")
        self.dataset, self.batch_size, self.seed = shards, int(batch_size), int(seed)
        self.rank, self.world_size, self.workers = int(rank), int(world_size), int(workers)
        self.crops, self.photometric, self.pin_memory = crops, photometric, pin_memory
        self.num_items = len(shards) if limit is None else min(int(limit), len(shards))
        streams = self.world_size * max(1, self.workers)
        if len(shards.urls) < streams:
            raise ValueError(f"{len(shards.urls)} shard(s) for {self.world_size} process(es) x {max(1, self.workers)} "
                             f"loader worker(s): every worker needs a shard of its own; lower data.workers or "
                             f"split the set into at least {streams} shards")
        if len(self) == 0:
            raise ValueError(f"no batches: {self.num_items} samples < one global batch of {self.global_batch_size}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return self.num_items // self.global_batch_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[CropBatch]:
        if epoch < 0 or not 0 <= start_step <= len(self):
            raise ValueError(f"epoch {epoch} / start_step {start_step} out of range (steps per epoch {len(self)})")
        stream = _ShardStream(self.dataset, self.batch_size, self.seed, epoch, start_step, len(self), self.rank,
                              self.world_size, self.crops, self.photometric)
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available())
        return self._iter(loader)

    def _iter(self, loader):
        for batch, bad in loader:
            self._report_skipped(bad)
            yield batch
