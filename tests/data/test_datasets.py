"""Datasets: IDX parsing, image folders (incl. broken files), torchvision error paths.

All data is made in tmp_path; nothing is downloaded.
"""

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcssl.data import (
    FASHION_MNIST_CLASSES,
    BatchLoader,
    DatasetNotFoundError,
    ImageFolderDataset,
    InMemoryImages,
    Unreadable,
    build_dataset,
    load_fashion_mnist,
    load_torchvision,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- IDX helpers


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool) -> Path:
    data = idx_bytes(arr, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fmnist(root: Path, prefix: str, n: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    ip = write_idx(root / f"{prefix}-images-idx3-ubyte", images, 2051, gz)
    lp = write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, 2049, gz)
    return images, labels, ip, lp


@pytest.fixture(autouse=True)
def _no_fmnist_env(monkeypatch, tmp_path):
    # Tests control the search path; a developer's $BCSSL_FMNIST_DIR or ./data must not leak in.
    monkeypatch.delenv("BCSSL_FMNIST_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, gz):
    root = tmp_path / "fm"
    images, labels, _, _ = make_fmnist(root, "train", 7, gz, seed=1)
    timg, tlab, _, _ = make_fmnist(root, "t10k", 3, gz, seed=2)

    ds = load_fashion_mnist(root, split="train")
    assert isinstance(ds, InMemoryImages)
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes == FASHION_MNIST_CLASSES and ds.num_classes == 10
    img, lab = ds[3]
    assert img.shape == (1, 28, 28) and lab == int(labels[3])

    test = load_fashion_mnist(root, split="test")
    assert len(test) == 3 and test.labels.tolist() == tlab.tolist()
    assert torch.equal(test.images[:, 0], torch.from_numpy(timg))
    # build_dataset goes to the same reader; 'val' is the test split for train/test sets.
    assert torch.equal(build_dataset("fashion-mnist", root, split="val").images, test.images)


def test_fashion_mnist_env_var_and_torchvision_layout(tmp_path, monkeypatch):
    # torchvision's download layout <root>/FashionMNIST/raw is found under $BCSSL_FMNIST_DIR.
    env_root = tmp_path / "env"
    _, labels, _, _ = make_fmnist(env_root / "FashionMNIST" / "raw", "t10k", 4, gz=False)
    monkeypatch.setenv("BCSSL_FMNIST_DIR", str(env_root))
    ds = load_fashion_mnist(split="test")
    assert ds.labels.tolist() == labels.tolist()


def test_fashion_mnist_bad_magic_names_file(tmp_path):
    root = tmp_path / "fm"
    make_fmnist(root, "train", 2, gz=False)
    bad = np.zeros((2, 28, 28), np.uint8)
    write_idx(root / "train-images-idx3-ubyte", bad, 2049, gz=False)  # labels magic on images
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic.*2051"):
        load_fashion_mnist(root)


def test_fashion_mnist_bad_size_and_count(tmp_path):
    root = tmp_path / "fm"
    _, _, ip, _ = make_fmnist(root, "train", 3, gz=False)
    ip.write_bytes(ip.read_bytes()[:-5])  # truncated pixel data
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*\(3, 28, 28\)"):
        load_fashion_mnist(root)
    make_fmnist(root, "train", 3, gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), 2049, gz=False)
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        load_fashion_mnist(root)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        load_fashion_mnist(tmp_path / "nowhere", split="test")
    msg = str(ei.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.download=true" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_fashion_mnist_download_reads_torchvision_raw_files(tmp_path, monkeypatch):
    # Stand-in for torchvision.datasets.FashionMNIST(download=True): writes the raw files
    # where torchvision would (<root>/FashionMNIST/raw), without any network.
    calls = []

    def fake_fashion_mnist(root, train=True, download=False):
        calls.append((root, train, download))
        make_fmnist(Path(root) / "FashionMNIST" / "raw", "train" if train else "t10k", 5, gz=False)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    ds = build_dataset("fashion_mnist", tmp_path / "dl", split="train", download=True)
    assert len(ds) == 5 and calls == [(str(tmp_path / "dl"), True, True)]
    # files present now: no second download
    assert len(load_fashion_mnist(tmp_path / "dl", download=True)) == 5 and len(calls) == 1


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_files():
    ds = load_fashion_mnist(split="test")  # root=None: finds /usr/share/datasets/fashion-mnist
    assert len(ds) == 10000 and ds.images.shape == (10000, 1, 28, 28)
    assert ds.labels.bincount().tolist() == [1000] * 10


# ----------------------------------------------------------------------------- image folder


def save_image(path: Path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def make_folder(root: Path) -> dict:
    """2 classes, varied sizes/formats, plus a truncated JPEG and a fake .png."""
    save_image(root / "cat" / "a.png", (40, 30), (255, 0, 0))
    save_image(root / "cat" / "b.jpg", (20, 50), (0, 255, 0))
    save_image(root / "cat" / "sub" / "c.png", (16, 16), (0, 0, 255))  # nested: still class cat
    save_image(root / "dog" / "d.jpeg", (64, 48), (200, 200, 200))
    save_image(root / "dog" / "e.png", (33, 17), (10, 20, 30))
    good_jpeg = root / "dog" / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good_jpeg)
    (root / "dog" / "trunc.jpg").write_bytes(good_jpeg.read_bytes()[:300])
    good_jpeg.unlink()
    (root / "dog" / "fake.png").write_bytes(b"this is not an image")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()  # not a class
    return {"good": 5, "bad": 2}


def test_image_folder_scan_and_decode(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    ds = ImageFolderDataset(root, load_size=24)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.labelled
    assert len(ds) == 7  # 5 good + 2 bad (found by extension, not opened at scan time)
    names = [os.path.relpath(ds.path(i), root) for i in range(len(ds))]
    assert names[:3] == ["cat/a.png", "cat/b.jpg", "cat/sub/c.png"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 1]

    img, lab = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and lab == 0
    assert img[0].float().mean() > 250 and img[1:].float().max() < 5  # red, resized
    img, lab = ds[names.index("dog/d.jpeg")]
    assert img.shape == (3, 24, 24) and lab == 1
    bad = ds[names.index("dog/trunc.jpg")]
    assert isinstance(bad, Unreadable) and bad.path.endswith("trunc.jpg") and "runcated" in bad.reason
    bad = ds[names.index("dog/fake.png")]
    assert isinstance(bad, Unreadable) and "cannot identify" in bad.reason


def test_image_folder_eval_transform_is_dinos_resize_then_center_crop(tmp_path):
    """dataset[i] == torchvision Resize(R, bicubic) + CenterCrop(C) of the original image (DINO's
    eval_knn / eval_linear transform), exactly, for any aspect ratio."""
    from torchvision import transforms

    rng = np.random.default_rng(1)
    (tmp_path / "c").mkdir()
    for k, (w, h) in enumerate([(61, 45), (30, 80), (40, 40)]):
        low = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR).save(tmp_path / "c" / f"{k}.png")
    ds = ImageFolderDataset(tmp_path, resize_size=20, crop_size=16)
    ref = transforms.Compose([transforms.Resize(20, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(16)])
    for i in range(len(ds)):
        img, _ = ds[i]
        expected = np.array(ref(Image.open(ds.path(i)).convert("RGB")))
        assert img.shape == (3, 16, 16) and np.array_equal(img.permute(1, 2, 0).numpy(), expected)
    assert ds.image_shape == (3, 16, 16) and ds.eval_transform == "resize20-centercrop16"


def test_image_folder_resize_shorter_side_then_center_crop(tmp_path):
    # 60x20 image: left third red, middle green, right blue -> the center crop is all green.
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(arr).save(tmp_path / "c" / "x.png")
    img, _ = ImageFolderDataset(tmp_path, load_size=10)[0]
    assert img.shape == (3, 10, 10)
    inner = img[:, :, 2:8].float()  # away from the bicubic border with red/blue
    assert inner[1].min() > 240 and inner[0].max() < 15 and inner[2].max() < 15


def test_loader_drops_bad_images_with_one_log_line(tmp_path, caplog):
    root = tmp_path / "imgs"
    counts = make_folder(root)
    ds = ImageFolderDataset(root, load_size=16)
    loader = BatchLoader(ds, 3, seed=0, drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning: bcssl's own log line
        with caplog.at_level("WARNING", logger="bcssl"):
            batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert sum(x.shape[0] for x, _ in batches) == counts["good"]
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64
        assert x.shape[0] == y.shape[0]
    assert loader.skipped == counts["bad"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "bcssl"]
    assert len(msgs) == 1 and msgs[0].startswith("skipping unreadable image ")
    assert ("trunc.jpg (OSError" in msgs[0] or "fake.png (UnidentifiedImageError" in msgs[0]), msgs
    # the dropped items were both dogs: 3 cats and 2 dogs remain
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == [0, 0, 0, 1, 1]
    # a second epoch keeps counting but does not log again
    caplog.clear()
    list(loader.epoch(1))
    assert loader.skipped == 2 * counts["bad"] and not caplog.records
    # both bad files in one batch: counted individually, batch just smaller
    one = BatchLoader(ds, len(ds), shuffle=False)
    (x, y), = list(one.epoch(0))
    assert one.skipped == counts["bad"] and x.shape[0] == y.shape[0] == counts["good"]


def test_loader_workers_same_as_main_process(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    ds = ImageFolderDataset(root, load_size=8)
    a = list(BatchLoader(ds, 2, seed=3, drop_last=False).epoch(0))
    lw = BatchLoader(ds, 2, seed=3, drop_last=False, workers=1)
    b = list(lw.epoch(0))
    assert lw.skipped == 2
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_flat_folder_and_file_list_are_unlabelled(tmp_path, caplog):
    flat = tmp_path / "flat"
    for k in range(3):
        save_image(flat / f"{k}.jpg", (12 + k, 10), (k * 50, 0, 0))
    (flat / "readme.txt").write_text("not an image")
    ds = build_dataset("image_folder", flat)
    assert len(ds) == 3 and ds.classes == [] and not ds.labelled and ds.targets.tolist() == [-1, -1, -1]
    img, label = ds[1]
    assert label == -1 and img.shape == (3, 224, 224)  # DINO's eval transform by default
    # a file list: paths relative to the root, blank lines and comments skipped, any order, a missing
    # file is just an unreadable item (counted by the loader), not a scan-time error
    (tmp_path / "list.txt").write_text("# pre-training subset\n2.jpg\n\n0.jpg\nmissing.jpg\n")
    ds = build_dataset("image_folder", flat, file_list=tmp_path / "list.txt")
    assert [Path(ds.path(i)).name for i in range(len(ds))] == ["2.jpg", "0.jpg", "missing.jpg"]
    assert not ds.labelled and isinstance(ds[2], Unreadable) and "file_list" in repr(ds)
    (flat / "inside.txt").write_text("1.jpg\n")  # a relative list not in the cwd is looked up in the root
    assert len(build_dataset("image_folder", flat, file_list="inside.txt")) == 1
    with pytest.raises(DatasetNotFoundError, match="data.file_list nope.txt not found"):
        build_dataset("image_folder", flat, file_list="nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DatasetNotFoundError, match="lists no images"):
        build_dataset("image_folder", flat, file_list=tmp_path / "empty.txt")
    save_image(flat / "thumbs" / "t.jpg", (8, 8), (0, 0, 0))  # a sub-folder makes it a class folder tree
    with caplog.at_level("WARNING", logger="bcssl"):
        ds = build_dataset("image_folder", flat)
    assert ds.classes == ["thumbs"] and len(ds) == 1
    assert "3 image(s) directly in the folder are not used" in caplog.text


def test_evaluations_need_labels(tmp_path):
    from bcssl.config import load_config
    from bcssl.data import dataset_from_config, evaluation_labels_missing, train_and_eval_sets

    save_image(tmp_path / "flat" / "0.jpg", (12, 10), (1, 2, 3))
    save_image(tmp_path / "labelled" / "train" / "a" / "0.jpg", (12, 10), (1, 2, 3))
    save_image(tmp_path / "labelled" / "val" / "a" / "1.jpg", (12, 10), (1, 2, 3))
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'flat'}", "data.eval_split=val",
                             "eval.data.resize_size=12", "eval.data.crop_size=8"])
    assert "eval.data.root=DIR" in evaluation_labels_missing(cfg)
    with pytest.raises(ValueError, match="flat folder without class folders.*eval.data.root=DIR"):
        dataset_from_config(cfg, "train")
    cfg.eval.data.root = str(tmp_path / "labelled")
    assert evaluation_labels_missing(cfg) is None
    sets = train_and_eval_sets(cfg)
    assert sets["val"].root == tmp_path / "labelled" / "val" and sets["val"][0][0].shape == (3, 8, 8)


def test_decode_on_device_cuts_the_workers_crops(tmp_path):
    """data.decode_on_device: each batch decoded by torchvision (here on the CPU) and cut into the
    same boxes as the PIL workers (same sampler, same seeds): PyTorch's antialiased bicubic follows
    PIL's filter, so crops agree up to rounding (and a little more at box edges, where PIL's
    crop-then-resize and the device's region resize both clamp); bad files are dropped and counted."""
    from bcssl.data.multicrop import MultiCropConfig

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for k, (w, h) in enumerate([(64, 48), (40, 70), (90, 60), (50, 50), (30, 80), (72, 40)]):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR).save(tmp_path / "c" / f"{k}.jpg", quality=95)
    (tmp_path / "c" / "6.jpg").write_bytes((tmp_path / "c" / "0.jpg").read_bytes()[:200])  # truncated JPEG
    save_image(tmp_path / "c" / "7.png", (20, 30), (0, 100, 200))  # not a JPEG: decoded by PIL in the worker
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2)
    pil = BatchLoader(ImageFolderDataset(tmp_path), 8, seed=2, crops=cfg)
    dev = BatchLoader(ImageFolderDataset(tmp_path, decode_on_device=True), 8, seed=2, crops=cfg, workers=1,
                      decode_device="cpu")
    (a,), (b,) = list(pil.epoch(0)), list(dev.epoch(0))
    assert pil.skipped == dev.skipped == 1 and len(a) == len(b) == 7
    assert torch.equal(a.positions, b.positions) and torch.equal(a.boxes, b.boxes) and torch.equal(a.sizes, b.sizes)
    for ga, gb in zip(a.groups, b.groups):
        diff = (ga.int() - gb.int()).abs()
        assert ga.shape == gb.shape and diff.float().mean() < 1.0 and diff[..., 2:-2, 2:-2].max() <= 6, diff.max()


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*<root>/<class_name>"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images .* in .*flat"):
        ImageFolderDataset(tmp_path / "flat")
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset("image_folder")


def test_image_folder_split_detection(tmp_path):
    save_image(tmp_path / "train" / "a" / "1.png", (8, 8), (0, 0, 0))
    save_image(tmp_path / "train" / "b" / "2.png", (8, 8), (0, 0, 0))
    save_image(tmp_path / "train" / "b" / "3.png", (8, 8), (0, 0, 0))
    save_image(tmp_path / "val" / "a" / "4.png", (8, 8), (0, 0, 0))
    tr = build_dataset("image_folder", tmp_path, split="train", load_size=8)
    va = build_dataset("image_folder", tmp_path, split="val", load_size=8)
    assert tr.root == tmp_path / "train" and len(tr) == 3 and tr.classes == ["a", "b"]
    assert va.root == tmp_path / "val" and len(va) == 1 and va.classes == ["a"]
    with pytest.raises(DatasetNotFoundError, match="no test/"):
        ImageFolderDataset(tmp_path, split="test")
    # Without train/ + val/, the root itself is the dataset whatever the split.
    flat = ImageFolderDataset(tmp_path / "train", split="val")
    assert flat.root == tmp_path / "train" and len(flat) == 3


# ----------------------------------------------------------------------------- torchvision / factory


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_missing_without_download(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="data.download=true"):
        load_torchvision(name, tmp_path, "train", download=False)
    with pytest.raises(DatasetNotFoundError, match="data.download=true"):
        build_dataset(name, tmp_path, split="test")


def test_torchvision_corrupt_folder_is_not_found(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # folder present, files missing
    with pytest.raises(DatasetNotFoundError, match="data.download=true"):
        load_torchvision("cifar10", tmp_path, "train")


def test_bad_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist.*image_folder.*cifar10.*cifar100.*stl10"):
        build_dataset("imagenet22k")
    with pytest.raises(ValueError, match="valid splits"):
        load_torchvision("stl10", tmp_path, "holdout")
    with pytest.raises(ValueError, match="valid splits"):
        load_fashion_mnist(tmp_path, split="unlabeled")


def test_in_memory_images_validation():
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        InMemoryImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])
    ds = InMemoryImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1], dtype=torch.int32), ["a", "b"])
    assert ds.labels.dtype == torch.int64 and ds.image_shape == (3, 4, 4) and len(ds) == 2
