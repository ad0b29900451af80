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
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 7  # 5 good + 2 bad (found by extension, not opened at scan time)
    names = [os.path.relpath(ds.path(i), root) for i in range(len(ds))]
    assert names[:3] == ["cat/a.png", "cat/b.jpg", "cat/sub/c.png"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 1]

    img, lab = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and lab == 0
    assert img[0].float().mean() > 250 and img[1:].float().max() < 5  # red, resized
    img, lab = ds[names.index("dog/d.jpeg")]
    assert img.shape == (3, 24, 24) and lab == 1
    assert ds[names.index("dog/trunc.jpg")] is None
    assert ds[names.index("dog/fake.png")] is None


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


def test_loader_drops_bad_images_with_one_warning(tmp_path):
    root = tmp_path / "imgs"
    counts = make_folder(root)
    ds = ImageFolderDataset(root, load_size=16)
    loader = BatchLoader(ds, 3, seed=0, drop_last=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    assert sum(x.shape[0] for x, _ in batches) == counts["good"]
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64
        assert x.shape[0] == y.shape[0]
    assert loader.skipped == counts["bad"]
    msgs = [str(w.message) for w in rec if "unreadable" in str(w.message)]
    assert len(msgs) == 1 and ("trunc.jpg" in msgs[0] or "fake.png" in msgs[0])
    # the dropped items were both dogs: 3 cats and 2 dogs remain
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == [0, 0, 0, 1, 1]
    # a second epoch keeps counting but does not warn again
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        list(loader.epoch(1))
    assert loader.skipped == 2 * counts["bad"] and not rec
    # both bad files in one batch: counted individually, batch just smaller
    one = BatchLoader(ds, len(ds), shuffle=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        (x, y), = list(one.epoch(0))
    assert one.skipped == counts["bad"] and x.shape[0] == y.shape[0] == counts["good"]


def test_loader_workers_same_as_main_process(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    ds = ImageFolderDataset(root, load_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = list(BatchLoader(ds, 2, seed=3, drop_last=False).epoch(0))
        lw = BatchLoader(ds, 2, seed=3, drop_last=False, workers=1)
        b = list(lw.epoch(0))
    assert lw.skipped == 2
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def smooth_jpegs(root: Path, sizes) -> None:
    """Smooth (upsampled noise) JPEGs of the given (w, h) in class folder c."""
    (root / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        low = torch.from_numpy(rng.integers(0, 256, (1, 3, 4, 4)).astype(np.float32))
        arr = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        Image.fromarray(arr[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()).save(
            root / "c" / f"{k}.jpg", quality=95)


def test_decode_on_device_matches_pil_decode(tmp_path):
    """decode_batch (torchvision decode_jpeg, here on the CPU) == the PIL path: exact when no
    resize is needed, within 1 level (PIL's fixed-point resampling) when the square is resized."""
    sizes = [(16, 16), (24, 16), (16, 30), (28, 24), (24, 30), (20, 20)]  # w - h even; no JPEG draft
    smooth_jpegs(tmp_path, sizes)
    pil = ImageFolderDataset(tmp_path, load_size=16)
    dev = ImageFolderDataset(tmp_path, load_size=16, decode_on_device=True)
    items = [dev[i][0] for i in range(len(dev))]
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in items)  # raw JPEG bytes
    x, bad = dev.decode_batch(items, "cpu")
    assert bad == [] and x.dtype == torch.uint8 and x.shape == (len(sizes), 3, 16, 16)
    for i, (w, h) in enumerate(sizes):
        diff = (pil[i][0].int() - x[i].int()).abs()
        assert diff.max() <= (0 if min(w, h) == 16 else 1), (w, h, diff.max())


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_decode_on_device_skips_bad_files(tmp_path, workers):
    """With data.decode_on_device the loader decodes each batch (here on the CPU): same images as
    the PIL path (solid colours), the truncated JPEG fails at decode time and the fake PNG in the
    worker; both are dropped and counted."""
    root = tmp_path / "imgs"
    counts = make_folder(root)
    ds = build_dataset("image_folder", root, load_size=16, decode_on_device=True)
    assert ds.decode_on_device and "decode_on_device=True" in repr(ds)
    ref = BatchLoader(ImageFolderDataset(root, load_size=16), 3, seed=0, drop_last=False)
    loader = BatchLoader(ds, 3, seed=0, drop_last=False, workers=workers, decode_device="cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches, ref_batches = list(loader.epoch(0)), list(ref.epoch(0))
    assert loader.skipped == ref.skipped == counts["bad"]
    assert len([w for w in rec if "unreadable" in str(w.message)]) == 2  # one per loader
    assert not [w for w in rec if issubclass(w.category, DeprecationWarning)]
    for (x, y), (xr, yr) in zip(batches, ref_batches):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) and x.shape[0] == y.shape[0]
        assert torch.equal(y, yr) and x.shape == xr.shape and ((x.int() - xr.int()).abs() <= 1).all()
    assert sum(x.shape[0] for x, _ in batches) == counts["good"]


def test_decode_batch_all_bad_and_mixed(tmp_path):
    smooth_jpegs(tmp_path, [(16, 16), (20, 16)])
    ds = ImageFolderDataset(tmp_path, load_size=8, decode_on_device=True)
    good = ds[0][0]
    broken = good[: len(good) // 2].clone()
    x, bad = ds.decode_batch([broken], "cpu")
    assert bad == [0] and x.shape == (0, 3, 8, 8) and x.dtype == torch.uint8
    decoded = ImageFolderDataset(tmp_path, load_size=8)[1][0]  # an already decoded item passes through
    x, bad = ds.decode_batch([good, broken, decoded], "cpu")
    assert bad == [1] and x.shape == (2, 3, 8, 8) and torch.equal(x[1], decoded)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist.*<root>/<class_name>"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    save_image(tmp_path / "flat" / "x.png", (8, 8), (1, 2, 3))  # images but no class folders
    with pytest.raises(DatasetNotFoundError, match="no class folders in .*flat"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
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
