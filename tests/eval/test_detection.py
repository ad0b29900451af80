"""Detection transfer (bcssl/eval/detection.py) on a tiny synthetic COCO set the test writes."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcssl.config import load_config
from bcssl.engine import checkpoint as ckpt
from bcssl.engine.trainer import train
from bcssl.eval.detection import BackboneFPN, CocoDetectionSet, coco_ap, coco_results, detection_of_run, lr_at
from bcssl.models import create_backbone
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def write_coco(root: Path, split: str, n: int, seed: int, size: int = 64) -> None:
    """``n`` noisy grey images with one or two filled rectangles: category 1 red, category 3 blue
    (ids with a gap, as COCO's). Image 0 of train also has a crowd box; the last train image has
    no annotation at all."""
    rng = np.random.default_rng(seed)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        pixels = rng.integers(90, 130, (size, size, 3), dtype=np.uint8)
        # one or two rectangles, the second in the right half so they never overlap
        boxes = [] if (split == "train" and i == n - 1) else [
            (1 + (i + j) % 2 * 2, 2 + 32 * j + rng.integers(0, 8), rng.integers(4, 24), rng.integers(12, 22),
             rng.integers(14, 30)) for j in range(1 + i % 2)]
        for cat, x, y, w, h in boxes:
            x, y, w, h = int(x), int(y), int(min(w, size - x)), int(min(h, size - y))
            pixels[y:y + h, x:x + w] = (220, 30, 30) if cat == 1 else (30, 30, 220)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x, y, w, h], "area": w * h,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        if split == "train" and i == 0:
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [40, 40, 10, 10],
                         "area": 100, "segmentation": [[40, 40, 50, 40, 50, 50, 40, 50]]})
        Image.fromarray(pixels).save(root / f"{split}2017" / f"{i:06d}.png")
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": "red"}, {"id": 3, "name": "blue"}]}))


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, "train", 5, seed=0)
    write_coco(root, "val", 3, seed=1)
    return root


def test_backbone_fpn_gives_five_256_channel_levels_from_the_four_stages():
    backbone = create_backbone("bcssl_atto", dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], stem_stride=4)
    fpn = BackboneFPN(backbone)
    body = fpn.body(torch.randn(2, 3, 64, 96))
    assert [tuple(v.shape[1:]) for v in body.values()] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]
    with torch.no_grad():  # stage 4 is the backbone's own feature map, normalised per position
        want = backbone.forward_features(torch.ones(1, 3, 64, 64))
        got = fpn.body.backbone.forward_intermediates(torch.ones(1, 3, 64, 64))[1][-1]
    assert torch.allclose(want, got)
    out = fpn(torch.randn(2, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3", "pool"] and all(v.shape[1] == 256 for v in out.values())
    with pytest.raises(ValueError, match="4 stage maps"):
        BackboneFPN(create_backbone("vit_s16", dims=64, depths=1, img_size=32))  # one stage map


def test_train_set_drops_crowds_and_empty_images_and_flips_boxes_with_masks(coco):
    from torchvision.transforms.v2 import functional as F

    data = CocoDetectionSet(coco / "train2017", coco / "annotations/instances_train2017.json", train=True, seed=0)
    assert len(data) == 4 and data.num_classes == 4  # the image without annotations is skipped; ids 1 and 3
    flipped = []
    for epoch in range(6):
        data.set_epoch(epoch)
        for i in range(len(data)):
            image, t = data[i]
            assert image.dtype == torch.float32 and image.shape == (3, 64, 64) and 0 <= image.min() <= image.max() <= 1
            assert set(t["labels"].tolist()) <= {1, 3}
            for box, mask, label in zip(t["boxes"], t["masks"], t["labels"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert torch.allclose(box, torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float(), atol=1)
                colour = image[:, ys, xs].median(1).values  # the mask covers its rectangle, flipped or not
                assert colour[0 if label == 1 else 2] > 0.8 and colour[2 if label == 1 else 0] < 0.2
            original = F.to_dtype(F.to_image(data.data[data.indices[i]][0]), torch.float32, scale=True)
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            flipped.append(not torch.equal(image, original))
            again, t2 = data[i]  # decided by (seed, epoch, index): the same every time
            assert torch.equal(image, again) and torch.equal(t["boxes"], t2["boxes"])
    assert 0.25 < sum(flipped) / len(flipped) < 0.75
    data.set_epoch(0)
    assert len(data[0][1]["boxes"]) == 1  # image 0's crowd annotation is not trained on


def test_ap_of_the_ground_truth_is_100_and_drops_for_shifted_boxes(coco):
    data = CocoDetectionSet(coco / "val2017", coco / "annotations/instances_val2017.json", train=False)
    outputs, ids = [], []
    for i in range(len(data)):
        _, t = data[i]
        n = len(t["boxes"])
        outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"][:, None].float()})
        ids.append(t["image_id"])
    boxes, segms = coco_results(outputs, ids)
    box = coco_ap(data.coco, boxes, "bbox", ids)
    assert box["AP"] == pytest.approx(100.0) and box["APs"] == pytest.approx(100.0)
    assert box["APl"] is None  # no object over 96^2 px: no score (null in detection.json), not NaN
    assert coco_ap(data.coco, segms, "segm", ids)["AP"] == pytest.approx(100.0)
    shifted = [{**o, "boxes": o["boxes"] + 6} for o in outputs]
    assert coco_ap(data.coco, coco_results(shifted, ids)[0], "bbox", ids)["AP"] < 60
    wrong = [{**o, "labels": 4 - o["labels"]} for o in outputs]  # 1 <-> 3
    assert coco_ap(data.coco, coco_results(wrong, ids)[0], "bbox", ids)["AP"] == 0.0
    assert coco_ap(data.coco, [], "bbox", ids)["AP"] == 0.0


def test_lr_warmup_then_steps():
    cfg = load_config(None, ["detection.lr=1e-4", "detection.warmup_iters=500", "detection.lr_steps=[27,33]"]).detection
    assert lr_at(0, 100, cfg) == pytest.approx(1e-7)
    assert lr_at(250, 100, cfg) == pytest.approx(1e-4 * (0.001 + 0.999 * 0.5))
    assert lr_at(500, 100, cfg) == lr_at(2699, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(2700, 100, cfg) == pytest.approx(1e-5) and lr_at(3300, 100, cfg) == pytest.approx(1e-6)


DET = ["detection.batch_size=2", "detection.min_size=[64,64]", "detection.max_size=64", "detection.test_size=64",
       "detection.workers=0", "detection.warmup_iters=2", "detection.lr_steps=[]", "detection.lr=3e-4",
       "detection.drop_path_rate=0.0", "detection.checkpoint_every_steps=0"]


def test_fine_tune_evaluate_and_resume_exactly(tmp_path, tiny_fmnist, coco):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = Path(train(cfg).run_dir)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    over = [f"detection.root={coco}", *DET]

    r = detection_of_run(run, [*over, "detection.epochs=2"], progress=False)
    assert r["train_images"] == 4 and r["val_images"] == 3 and r["num_classes"] == 4 and r["steps"] == 4
    assert all(0 <= r[k] <= 100 for k in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"))
    assert len(r["epoch_losses"]) == 2 and r["epoch_losses"][1] < r["epoch_losses"][0]
    assert json.loads((run / "detection.json").read_text())["box_AP"] == r["box_AP"]

    # 1 epoch, then rerun with 2: continues from the checkpoint to the same weights
    assert len(detection_of_run(resumed, [*over, "detection.epochs=1"], progress=False)["epoch_losses"]) == 1
    again = detection_of_run(resumed, [*over, "detection.epochs=2"], progress=False)
    assert again["epoch_losses"] == pytest.approx([r["epoch_losses"][1]], rel=1e-6)
    a = ckpt.load(run / "detection" / "checkpoint.pt")["model"]
    b = ckpt.load(resumed / "detection" / "checkpoint.pt")["model"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    assert again["box_AP"] == pytest.approx(r["box_AP"], abs=1e-6)


def test_cli_errors_name_what_is_missing(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "bcssl", "eval", "detection", run], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 1 and "set detection.root" in out.stderr
    out = subprocess.run([sys.executable, "-m", "bcssl", "eval", "detection", run, f"detection.root={tmp_path}/none"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "COCO image folder" in out.stderr and "none/train2017" in out.stderr


def test_two_processes_fine_tune_and_rank_0_reports(tmp_path, tiny_fmnist, coco):
    """torchrun, 2 CPU processes (gloo) with 1 image each per step: DDP over the whole detector
    (no parameter left without a gradient), one detection.json."""
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "bcssl", "eval", "detection", "--nproc", "2", "--json", run,
                          f"detection.root={coco}", *DET, "detection.epochs=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["steps"] == 2 and len(r["epoch_losses"]) == 1 and "box_AP" in r
    assert ckpt.load(Path(run) / "detection" / "checkpoint.pt")["step"] == 2


def test_bf16_autocast_fine_tunes_and_bad_amp_is_refused(tmp_path, tiny_fmnist, coco):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    r = detection_of_run(run, [f"detection.root={coco}", *DET, "detection.epochs=1", "detection.amp=bf16"],
                         progress=False)
    assert len(r["epoch_losses"]) == 1 and math.isfinite(r["epoch_losses"][0])
    from bcssl.engine.runtime import TrainingError
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        detection_of_run(run, [f"detection.root={coco}", *DET, "detection.amp=fp16"], progress=False)
    from bcssl.config import ConfigError
    with pytest.raises(ConfigError, match="detection.amp must be"):
        load_config(None, ["detection.amp=fp8"])
