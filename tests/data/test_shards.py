"""Tar shards (data.name=webdataset): shard split, determinism, exact resume, counts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")  # a dev dependency: pip install 'bcssl[webdataset]'

from bcssl.data.multicrop import MultiCropConfig  # noqa: E402
from bcssl.data.shards import ShardLoader, TarShards, expand_urls  # noqa: E402

CROPS = MultiCropConfig(global_size=16, local_size=8, n_local=1)


@pytest.fixture
def shards(tmp_path):
    """4 shards x 8 samples; the label is the sample's number (0..31), so batches show which came."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"part-{s:03d}.tar")) as sink:
            for i in range(8):
                img = Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
                sink.write({"__key__": f"s{s}_{i}", "png": img, "cls": s * 8 + i})
    return str(tmp_path / "part-{000..003}.tar")


def batches(loader, epoch=0, start=0):
    return [(b.labels.tolist(), b.boxes.clone(), [g.clone() for g in b.groups]) for b in loader.epoch(epoch, start)]


def same(a, b) -> bool:
    return all(x[0] == y[0] and torch.equal(x[1], y[1]) and all(torch.equal(g, h) for g, h in zip(x[2], y[2]))
               for x, y in zip(a, b)) and len(a) == len(b)


def test_urls_and_counting(shards):
    assert len(expand_urls(shards)) == 4 and expand_urls(f"{shards} {shards}")[4].endswith("part-000.tar")
    assert len(TarShards(shards)) == 32 and len(TarShards(shards, num_samples=20)) == 20
    with pytest.raises(ValueError, match="data.num_samples is needed"):
        TarShards("pipe:cat x-{0..1}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_is_deterministic_and_resume_is_exact(shards, workers):
    loader = ShardLoader(TarShards(shards), 4, seed=3, workers=workers, crops=CROPS)
    assert len(loader) == 8
    full = batches(loader)
    assert len(full) == 8 and all(len(b[0]) == 4 for b in full)
    assert same(full, batches(loader))  # the same epoch again
    assert same(full[5:], batches(loader, start=5))  # a run resumed at step 5 gets the rest exactly
    assert not same(full, batches(loader, epoch=1))  # another epoch: another order
    seen = sorted(sum((b[0] for b in full), []))
    assert len(set(seen)) >= 24  # one pass over 32 samples (workers cycle their own shards)


def test_processes_read_disjoint_shards(shards):
    per_rank = [sum((b[0] for b in batches(ShardLoader(TarShards(shards), 4, seed=0, rank=r, world_size=2,
                                                                crops=CROPS))), []) for r in range(2)]
    shard_of = [{label // 8 for label in labels} for labels in per_rank]
    assert shard_of[0].isdisjoint(shard_of[1]) and shard_of[0] | shard_of[1] == {0, 1, 2, 3}
    assert len(per_rank[0]) == len(per_rank[1]) == 16  # 32 // (4 x 2) = 4 steps on each process


def test_too_few_shards_for_the_workers_is_one_clear_error(shards):
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 2 process\(es\) x 3 loader worker\(s\)"):
        ShardLoader(TarShards(shards), 4, world_size=2, workers=3, crops=CROPS)


def test_a_broken_sample_is_dropped_and_counted(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "bad-0.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": b"not a jpeg" if i == 2 else _png(), "cls": i})
    loader = ShardLoader(TarShards(str(tmp_path / "bad-0.tar")), 4, crops=CROPS)
    (batch,) = list(loader.epoch(0))
    assert sorted(batch.labels.tolist()) == [0, 1, 3] and loader.skipped == 1


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_evaluations_of_a_shard_run_need_a_labelled_folder(shards):
    from bcssl.config import load_config
    from bcssl.data import UnlabelledDataError, dataset_from_config, evaluation_labels_missing

    cfg = load_config("demo_fmnist", ["data.name=webdataset", f"data.urls={shards}"])
    assert "eval.data.root=DIR" in evaluation_labels_missing(cfg)
    with pytest.raises(UnlabelledDataError, match="eval.data.root"):
        dataset_from_config(cfg, "train")
