"""A real-world folder: broken files are skipped and counted once, odd formats are converted,
a huge JPEG is decoded at reduced size, and a folder of nothing but broken files stops before
training with one message."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bcssl.data import ImageFolderDataset, UnreadableDataError
from bcssl.data.crops import CropItem, Unreadable
from bcssl.data.multicrop import MultiCropConfig
from bcssl.engine.trainer import train
from tests.conftest import tiny_config
from tests.data.test_crops import flat_gray_jpeg

CROPS = MultiCropConfig(global_size=32, local_size=16, n_local=2)


def bad_folder(root) -> dict[str, str]:
    """16 files: 3 unreadable, 6 odd but valid, 7 plain JPEGs. Returns name -> what it is."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(7):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((48 + 7 * k, 40 + 5 * k), Image.Resampling.BILINEAR).save(root / f"plain{k}.jpg")
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((root / "plain0.jpg").read_bytes()[:400])
    (root / "text.jpg").write_text("this is a text file with an image name\n")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    Image.new("L", (30, 40), 90).save(root / "gray.jpg")
    Image.fromarray(np.full((20, 24), 0x8000, np.uint16)).save(root / "sixteen.png")  # 16-bit: mid-gray
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 20, 200, 40] + [0] * 762)
    pal.save(root / "palette.png", transparency=0)  # index 0 transparent, the image is index 1 (green)
    Image.new("RGB", (1, 1), (250, 10, 10)).save(root / "one.png")
    flat_gray_jpeg(root / "huge.jpg", 12000, 9000)
    return {"zero.jpg": "bad", "truncated.jpg": "bad", "text.jpg": "bad"}


def test_each_odd_file_is_converted_or_reported(tmp_path):
    bad_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(tmp_path / "imgs")
    items = {ds.path(i).rsplit("/", 1)[1]: ds.crop_item(i, i, CROPS) for i in range(len(ds))}
    assert len(items) == 16
    reasons = {k: v.reason for k, v in items.items() if isinstance(v, Unreadable)}
    assert set(reasons) == {"zero.jpg", "truncated.jpg", "text.jpg"}
    assert "cannot identify" in reasons["zero.jpg"] and "cannot identify" in reasons["text.jpg"]
    assert "runcated" in reasons["truncated.jpg"]

    def colour(name):  # mean RGB of all crops
        return np.mean([g.float().mean((0, 2, 3)).numpy() for g in items[name].groups], 0)

    assert all(isinstance(items[k], CropItem) for k in items if k not in reasons)
    assert np.allclose(colour("cmyk.jpg"), [255, 0, 0], atol=3)
    assert np.allclose(colour("gray.jpg"), [90, 90, 90], atol=2)
    assert np.allclose(colour("sixteen.png"), [128, 128, 128], atol=1)  # scaled, not clipped to white
    assert np.allclose(colour("palette.png"), [20, 200, 40], atol=1)
    assert np.allclose(colour("one.png"), [250, 10, 10], atol=1) and items["one.png"].size == (1, 1)
    assert items["huge.jpg"].decoded == (1500, 1125)
    (tmp_path / "bomb").mkdir()
    flat_gray_jpeg(tmp_path / "bomb" / "panorama.jpg", 20000, 10000)
    bomb = ImageFolderDataset(tmp_path / "bomb").crop_item(0, 0, CROPS)  # 200 MP: PIL refuses it
    assert isinstance(bomb, Unreadable) and bomb.reason.startswith("DecompressionBombError")


def test_bad_image_folder_trains_to_the_end_with_the_right_skip_count(tmp_path, caplog):
    bad_folder(tmp_path / "imgs")
    cfg = tiny_config(tmp_path, tmp_path / "imgs", "data.name=image_folder", "train.epochs=1", "train.batch_size=4",
                      "eval.final_knn=false", "train.checkpoint_every_steps=0")
    with caplog.at_level("WARNING", logger="bcssl"):
        out = train(cfg)
    assert out.skipped_images == 3 and out.images_seen == 16 - 3  # every file is visited once in the epoch
    records = [json.loads(line) for line in open(f"{out.run_dir}/metrics.jsonl")]
    assert [r["skipped_images"] for r in records if r["kind"] == "data"] == [3]
    assert len([r for r in records if r["kind"] == "train"]) == 4 and all(np.isfinite(r["loss"]) for r in records
                                                                         if r["kind"] == "train")
    skips = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skips) == 2 and skips[0].startswith("skipping unreadable image ") and "3 unreadable" in skips[1]


def test_all_unreadable_folder_stops_before_training_with_one_line(tmp_path, capsys):
    from bcssl.cli import main

    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(40):
        (root / f"{k}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(k))  # a JPEG start, then nothing
    cfg = tiny_config(tmp_path, root, "data.name=image_folder", "train.batch_size=4")
    with pytest.raises(UnreadableDataError, match=r"could not decode any of 32 images spread over its 40 "
                                                  r"\(first: .*0.jpg: "):
        train(cfg)
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()  # nothing was trained
    rc = main(["pretrain", "--config", "demo_fmnist", "data.name=image_folder", f"data.root={root}",
               f"run.dir={tmp_path}/cli", "train.batch_size=4", "data.workers=0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("bcssl: error: ") and "Traceback" not in err
