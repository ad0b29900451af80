"""BatchLoader: deterministic order, exact resume, rank slicing, limit, drop_last."""

import pytest
import torch
from torch.utils.data import Dataset

import bcssl.data.loader as loader_mod
from bcssl.data import BatchLoader, InMemoryImages, epoch_order, steps_per_epoch


def indexed_set(n: int) -> InMemoryImages:
    """Image i is filled with i % 256 and has label i, so batches reveal their indices."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return InMemoryImages(images, torch.arange(n), [str(i) for i in range(n)])


class PlainDataset(Dataset):
    """Same items without .images/.labels: goes through the DataLoader path."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def labels_of(batches):
    return [y.tolist() for _, y in batches]


def test_steps_per_epoch():
    assert steps_per_epoch(10, 3) == 3
    assert steps_per_epoch(10, 3, drop_last=False) == 4
    assert steps_per_epoch(10, 2, world_size=2) == 2
    assert steps_per_epoch(10, 2, world_size=2, drop_last=False) == 3
    assert steps_per_epoch(12, 3, world_size=2) == 2
    assert steps_per_epoch(3, 4) == 0
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0)


def test_epoch_order():
    a = epoch_order(50, seed=7, epoch=0)
    assert a.dtype == torch.int64 and sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, seed=7, epoch=0))  # deterministic
    assert not torch.equal(a, epoch_order(50, seed=7, epoch=1))  # epochs differ
    assert not torch.equal(a, epoch_order(50, seed=8, epoch=0))  # seeds differ
    assert not torch.equal(a, torch.arange(50))
    assert torch.equal(epoch_order(50, seed=7, epoch=3, shuffle=False), torch.arange(50))
    # independent of the global RNG state
    torch.manual_seed(123)
    assert torch.equal(a, epoch_order(50, seed=7, epoch=0))


def test_deterministic_per_seed_and_epoch():
    ds = indexed_set(40)
    l1, l2 = BatchLoader(ds, 4, seed=5), BatchLoader(ds, 4, seed=5)
    e0 = labels_of(l1.epoch(0))
    assert e0 == labels_of(l2.epoch(0)) == labels_of(l1.epoch(0))
    assert e0 != labels_of(l1.epoch(1))
    assert e0 != labels_of(BatchLoader(ds, 4, seed=6).epoch(0))
    flat = sum(e0, [])
    assert len(flat) == 40 and len(set(flat)) == 40  # each item once
    for x, y in l1.epoch(0):
        assert x.dtype == torch.uint8 and x.shape == (4, 1, 4, 4) and y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long(), y % 256)  # images match their labels


def test_start_step_is_tail_of_epoch():
    ds = indexed_set(37)
    loader = BatchLoader(ds, 5, seed=1)
    full = labels_of(loader.epoch(2))
    assert len(full) == len(loader) == 7
    for k in (0, 3, 6, 7):
        assert labels_of(loader.epoch(2, start_step=k)) == full[k:]
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(2, start_step=8)


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_slices_concatenate_to_global_batch(drop_last):
    ds = indexed_set(27)
    single = labels_of(BatchLoader(ds, 6, seed=4, drop_last=drop_last).epoch(1))
    ranks = [labels_of(BatchLoader(ds, 2, seed=4, drop_last=drop_last, rank=r, world_size=3).epoch(1))
             for r in range(3)]
    assert all(len(r) == len(single) for r in ranks)
    for step, glob in enumerate(single):
        assert ranks[0][step] + ranks[1][step] + ranks[2][step] == glob
        if drop_last or step < len(single) - 1:
            assert [len(r[step]) for r in ranks] == [2, 2, 2]
    if not drop_last:  # last global batch of 3 is split over the 3 ranks
        assert [len(r[-1]) for r in ranks] == [1, 1, 1]


def test_limit_uses_first_items():
    ds = indexed_set(100)
    loader = BatchLoader(ds, 8, seed=0, limit=20)
    assert loader.num_items == 20 and len(loader) == 2
    seen = sum(labels_of(loader.epoch(0)), [])
    assert len(seen) == 16 and max(seen) < 20
    every = sum(labels_of(BatchLoader(ds, 8, seed=0, limit=20, drop_last=False).epoch(0)), [])
    assert sorted(every) == list(range(20))
    assert BatchLoader(ds, 8, limit=1000).num_items == 100


def test_drop_last():
    ds = indexed_set(10)
    dropped = labels_of(BatchLoader(ds, 4, seed=2).epoch(0))
    assert [len(b) for b in dropped] == [4, 4]
    kept = labels_of(BatchLoader(ds, 4, seed=2, drop_last=False).epoch(0))
    assert [len(b) for b in kept] == [4, 4, 2]
    assert kept[:2] == dropped and sorted(sum(kept, [])) == list(range(10))
    with pytest.raises(ValueError, match="no batches"):
        BatchLoader(ds, 11)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 2, rank=2, world_size=2)


def test_fast_path_skips_dataloader_and_matches_it(monkeypatch):
    ds = indexed_set(30)
    via_loader = list(BatchLoader(PlainDataset(ds), 4, seed=9, drop_last=False).epoch(3, start_step=1))

    def no_dataloader(*a, **k):
        raise AssertionError("InMemoryImages must not go through a DataLoader")

    monkeypatch.setattr(loader_mod, "DataLoader", no_dataloader)
    fast = BatchLoader(ds, 4, seed=9, drop_last=False)
    assert fast.in_memory
    direct = list(fast.epoch(3, start_step=1))
    assert len(direct) == len(via_loader) == 7
    for (xa, ya), (xb, yb) in zip(direct, via_loader):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert fast.skipped == 0
