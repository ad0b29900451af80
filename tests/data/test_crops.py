"""Crop geometry of image files (bcssl.data.crops): DINO's RandomResizedCrop over the original image,
cut with PIL where the file is decoded, and the photometric part from ready crops."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from bcssl.data import BatchLoader, CropBatch, ImageFolderDataset
from bcssl.data.crops import CropItem, crop_boxes, crop_seed, cut_crops, sample_box
from bcssl.data.multicrop import MultiCrop, MultiCropConfig
from tests.data.test_multicrop import photometric_reference

SMALL = MultiCropConfig(global_size=24, local_size=12, n_local=3)


def ks_2samp(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value (Kolmogorov's series with
    Stephens' small-sample correction, as in Numerical Recipes' ``kstwo``)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    x = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, x, side="right") / len(a) - np.searchsorted(b, x, side="right") / len(b)).max())
    ne = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.2:  # the series converges slowly there; the p-value is 1 to 12 digits
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def test_ks_helper_against_known_values():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    assert ks_2samp(a, b)[1] > 0.05 and ks_2samp(a, b + 0.2)[1] < 1e-6
    assert ks_2samp([0, 1, 2], [0, 1, 2]) == (0.0, 1.0)


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)], ids=["global", "local"])
def test_boxes_match_torchvision_get_params(scale):
    """10k boxes of a 500x375 image: area fraction and log aspect ratio distributed as torchvision's
    RandomResizedCrop.get_params (two-sample KS, p > 0.01); a 0.1 shift of the scale is detected."""
    w, h, n = 500, 375, 10_000
    ratio = (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    ours = np.array([sample_box(rng, w, h, scale, ratio) for _ in range(n)], float)
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    ref = np.array([transforms.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], float)
    for boxes in (ours, ref):  # (top, left, height, width) inside the image
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()

    def area(b):
        return b[:, 2] * b[:, 3] / (w * h)

    def log_ratio(b):
        return np.log(b[:, 3] / b[:, 2])

    for stat in (area, log_ratio):
        d, p = ks_2samp(stat(ours), stat(ref))
        assert p > 0.01, (stat.__name__, d, p)
    # the test has power: boxes drawn from a scale range shifted by 0.1 are told apart
    shifted = np.array([sample_box(rng, w, h, (scale[0] + 0.1, scale[1]), ratio) for _ in range(n)], float)
    assert ks_2samp(area(shifted), area(ref))[1] < 1e-6
    # the horizontal position covers the whole width (uniform over the valid range)
    assert ours[:, 1].min() == 0 and (ours[:, 1] + ours[:, 3]).max() == w


def test_fallback_is_torchvision_centre_crop():
    """An image too wide for any try (scale near 1, 10:1 aspect): the centre crop of ratio 4/3."""
    rng = np.random.default_rng(0)
    assert sample_box(rng, 1000, 100, (0.99, 1.0), (3 / 4, 4 / 3)) == (0, 433, 100, 133)
    assert sample_box(rng, 100, 1000, (0.99, 1.0), (3 / 4, 4 / 3)) == (433, 0, 133, 100)


def test_wide_image_crops_reach_both_outer_thirds(tmp_path):
    """A 900x300 image whose left/middle/right thirds are red/green/blue: over 300 global crops at
    scale (0.4, 1), crops reach into both outer thirds (impossible from the old 300x300 centre
    square, which is all green), seen both in the boxes and in the pixels of the crops."""
    arr = np.zeros((300, 900, 3), np.uint8)
    arr[:, :300, 0] = arr[:, 300:600, 1] = arr[:, 600:, 2] = 255
    (tmp_path / "w").mkdir()
    Image.fromarray(arr).save(tmp_path / "w" / "wide.png")
    ds = ImageFolderDataset(tmp_path / "w")
    cfg = MultiCropConfig(global_size=32, n_local=0, global_scale=(0.4, 1.0))
    red = blue = 0
    x0, x1 = [], []
    for seed in range(150):
        item = ds.crop_item(0, seed, cfg)
        assert isinstance(item, CropItem) and item.size == (900, 300)
        for (_, left, _, width), crop in zip(item.boxes.tolist(), item.groups[0]):
            x0.append(left)
            x1.append(left + width)
            red += bool((crop[0] > 200).any() and (crop[1:] < 60).any())
            blue += bool((crop[2] > 200).any() and (crop[:2] < 60).any())
    assert min(x0) < 300 and max(x1) > 600
    assert red > 30 and blue > 30, (red, blue)


def test_pil_crop_is_torchvision_resized_crop_exactly(tmp_path):
    """Each crop == torchvision's F.resized_crop(PIL image, box, size, bicubic): what
    DataAugmentationDINO's RandomResizedCrop does once it has the box (antialiased when shrinking)."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((97, 71), Image.Resampling.BICUBIC)
    boxes = crop_boxes(crop_seed(0, 5, 2), 97, 71, SMALL)
    groups = cut_crops(img, boxes, (97, 71), SMALL)
    assert [tuple(g.shape) for g in groups] == [(2, 3, 24, 24), (3, 3, 12, 12)]
    crops = [c for g in groups for c in g]
    sizes = [24, 24, 12, 12, 12]
    for (i, j, h, w), s, crop in zip(boxes, sizes, crops):
        ref = np.array(TF.resized_crop(img, i, j, h, w, [s, s], transforms.InterpolationMode.BICUBIC))
        assert np.array_equal(crop.permute(1, 2, 0).numpy(), ref)


def test_crop_seeds_are_per_step_and_position():
    seeds = {crop_seed(0, s, p) for s in range(4) for p in range(64)}
    assert len(seeds) == 256 and crop_seed(1, 0, 0) != crop_seed(0, 0, 0)
    assert crop_boxes(crop_seed(0, 1, 2), 400, 300, SMALL) == crop_boxes(crop_seed(0, 1, 2), 400, 300, SMALL)


def test_loader_crop_batches_match_one_process_for_any_rank_split_and_drops(tmp_path):
    """World size 2 (two rank loaders) makes the crops one loader makes with the same global batch,
    and an unreadable file changes nothing for the other images of its batch (positions)."""
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40 + 3 * k, 30 + 5 * k)).save(
            tmp_path / "c" / f"{k}.jpg")
    ds = ImageFolderDataset(tmp_path)
    one = list(BatchLoader(ds, 4, seed=1, crops=SMALL).epoch(1))
    (tmp_path / "c" / "3.jpg").write_bytes(b"")  # now unreadable
    ranks = [list(BatchLoader(ds, 2, seed=1, crops=SMALL, rank=r, world_size=2, workers=r).epoch(1)) for r in (0, 1)]
    mc = MultiCrop(SMALL)
    for step, full in enumerate(one):
        parts = [ranks[r][step] for r in (0, 1)]
        assert all(isinstance(p, CropBatch) for p in parts)
        pos = torch.cat([p.positions for p in parts])
        keep = torch.isin(full.positions, pos)
        assert keep.sum() == len(pos) >= 3  # the empty file dropped once, in one of the two steps
        ref = mc.from_crops(full.groups, 7, full.positions, 4)
        got = [mc.from_crops(p.groups, 7, p.positions, 4) for p in parts if len(p)]
        for j in range(2 + SMALL.n_local):
            assert torch.equal(torch.cat([g[j] for g in got]), ref[j][keep])
        assert torch.equal(torch.cat([p.boxes for p in parts]), full.boxes[keep])


def reference_from_crops(groups, params, cfg):
    """Per-image torchvision ops in DINO's order on the ready crops: flip, then the photometric part."""
    crops = [g[:, k].float() / 255 for g in groups for k in range(g.shape[1])]
    flipped = [torch.where(params["flip"][:, j].view(-1, 1, 1, 1), c.flip(-1), c) for j, c in enumerate(crops)]
    return photometric_reference(flipped, params, cfg)


def test_from_crops_is_flip_then_dinos_photometric_part():
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=3, jitter_p=0.5, grayscale_p=0.4,
                          blur_p=(1.0, 0.5, 0.5), solarize_p=(0.0, 0.5, 0.5))
    g = torch.Generator().manual_seed(0)
    groups = [torch.randint(0, 256, (5, 2, 3, 24, 24), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (5, 3, 3, 12, 12), dtype=torch.uint8, generator=g)]
    mc = MultiCrop(cfg)
    positions = torch.tensor([6, 0, 3, 1, 5])
    out = mc.from_crops(groups, 11, positions, 8)
    params = mc.select_params(mc.sample_params(8, 11), positions)
    assert params["flip"].any() and not params["flip"].all()
    for o, r in zip(out, reference_from_crops(groups, params, cfg)):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="expected crop groups"):
        mc.apply_crops([groups[0][:, :1], groups[1]], params)


def flat_gray_jpeg(path, width: int, height: int) -> None:
    """A valid baseline grayscale JPEG of mid-gray (128), written without ever holding its pixels:
    every 8x8 block is 'DC difference 0, end of block', 2 bits with one-code Huffman tables."""
    import struct

    def seg(marker, payload):
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one symbol (0x00) with a 1-bit code
    with open(path, "wb") as f:
        f.write(b"\xff\xd8" + seg(0xFFDB, b"\x00" + bytes([1] * 64))
                + seg(0xFFC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
                + seg(0xFFC4, b"\x00" + one_code) + seg(0xFFC4, b"\x10" + one_code)
                + seg(0xFFDA, b"\x01\x01\x00\x00\x3f\x00") + bytes((2 * blocks + 7) // 8) + b"\xff\xd9")


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A 12000x9000 JPEG (108 MP, above PIL's bomb warning) is decoded at 1/8 (1500x1125: 5 MB of
    RGB, not 324 MB), quickly and without a warning; boxes stay in the file's pixels."""
    import warnings

    (tmp_path / "h").mkdir()
    flat_gray_jpeg(tmp_path / "h" / "huge.jpg", 12000, 9000)
    ds = ImageFolderDataset(tmp_path / "h")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = time.perf_counter()
        item = ds.crop_item(0, 0, MultiCropConfig(n_local=2))
        dt = time.perf_counter() - t
    assert isinstance(item, CropItem) and item.size == (12000, 9000) and item.decoded == (1500, 1125)
    assert dt < 3.0, dt
    boxes = item.boxes
    assert (boxes[:, 2] * boxes[:, 3]).min() >= 0.05 * 12000 * 9000 * 0.99 and (boxes[:, 1] + boxes[:, 3]).max() <= 12000
    assert all(g.float().sub(128).abs().max() <= 1 for g in item.groups)


def test_two_processes_make_exactly_the_crops_of_one(tmp_path):
    """torchrun, 2 gloo processes with 2 images each (one worker each) == 1 process with the global
    batch of 4: every crop bit for bit, with an unreadable file in the data."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rng = np.random.default_rng(1)
    (tmp_path / "c").mkdir()
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((50 + 9 * k, 70 - 4 * k)).save(
            tmp_path / "c" / f"{k}.jpg")
    (tmp_path / "c" / "5.jpg").write_bytes(b"not a JPEG")
    script = tmp_path / "crops.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {repo!r})
from bcssl.data import BatchLoader, ImageFolderDataset
from bcssl.data.multicrop import MultiCrop, MultiCropConfig
from bcssl.engine.distributed import init_distributed, shutdown_distributed
info, _ = init_distributed("cpu")
cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2)
loader = BatchLoader(ImageFolderDataset({str(tmp_path)!r}), 2, seed=3, crops=cfg, rank=info.rank,
                     world_size=info.world_size, workers=1)
mc = MultiCrop(cfg)
out = [(b.positions, mc.from_crops(b.groups, 100 + s, b.positions, loader.global_batch_size) if len(b) else None)
       for s, b in enumerate(loader.epoch(0))]
torch.save(out, {str(tmp_path)!r} + f"/rank{{info.rank}}.pt")
shutdown_distributed()
""")
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2)
    mc = MultiCrop(cfg)
    one = list(BatchLoader(ImageFolderDataset(tmp_path), 4, seed=3, crops=cfg).epoch(0))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2
    for s, full in enumerate(one):
        ref = mc.from_crops(full.groups, 100 + s, full.positions, 4)
        parts = [ranks[r][s] for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), full.positions)
        for j in range(4):
            assert torch.equal(torch.cat([p[1][j] for p in parts if p[1] is not None]), ref[j])
    assert sum(len(p[0]) for r in ranks for p in r) == 7  # the unreadable file dropped once


def test_worker_photometric_finishes_the_crops_the_trainer_would(tmp_path):
    """CPU training with loader workers: the workers run MultiCrop.from_crops on their batch
    (CropBatch.views), with the step's seed: the same crops as the trainer makes from the groups."""
    from functools import partial

    from bcssl.data import WorkerPhotometric
    from bcssl.engine.runtime import step_seed

    rng = np.random.default_rng(2)
    (tmp_path / "c").mkdir()
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40 + 6 * k, 50)).save(
            tmp_path / "c" / f"{k}.jpg")
    ds = ImageFolderDataset(tmp_path)
    photometric = WorkerPhotometric(SMALL, partial(step_seed, 4), 3)
    loader = BatchLoader(ds, 3, seed=4, crops=SMALL, workers=1, photometric=photometric)
    mc = MultiCrop(SMALL)
    batches = list(loader.epoch(2))
    assert len(batches) == 2
    for s, batch in enumerate(batches):
        step = 2 * 2 + s  # epoch 2 of 2 steps
        ref = mc.from_crops(batch.groups, step_seed(4, step), batch.positions, 3)
        assert batch.views is not None and all(torch.equal(v, r) for v, r in zip(batch.views, ref))


def test_training_losses_do_not_depend_on_where_the_crops_are_finished(tmp_path):
    """Image folder on the CPU: 0 loader workers (the trainer finishes the crops) and 1 worker (the
    worker does) train to the same losses."""
    import json

    from bcssl.engine.trainer import train
    from tests.conftest import tiny_config

    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40 + 5 * k, 64 - 3 * k)).save(
            tmp_path / "imgs" / f"{k}.jpg")
    losses = []
    for workers in (0, 1):
        cfg = tiny_config(tmp_path / f"w{workers}", tmp_path / "imgs", "data.name=image_folder", "train.epochs=1",
                          "train.batch_size=4", "eval.final_knn=false", f"data.workers={workers}")
        out = train(cfg)
        losses.append([json.loads(line)["loss"] for line in open(f"{out.run_dir}/metrics.jsonl") if '"train"' in line])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
