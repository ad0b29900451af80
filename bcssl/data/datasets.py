"""Datasets that yield uint8 images for the batched, on-device multi-crop pipeline.

Every dataset here returns ``(image, label)`` with ``image`` a uint8 tensor ``(C, H, W)``
(C = 1 for grayscale sets, 3 otherwise) and ``label`` an int, and exposes ``classes``,
``num_classes`` and ``__len__``. Augmentation is *not* done here: it runs batched on the
training device (``bcssl.data.multicrop``), so per-image Python work stays minimal.

- :class:`InMemoryImages` holds small sets (Fashion-MNIST, CIFAR, STL-10) as one tensor;
  :class:`~bcssl.data.loader.BatchLoader` indexes it directly (no DataLoader).
- :class:`ImageFolderDataset` decodes files lazily (ImageNet-style folders) to a fixed
  ``load_size`` square so that batches stack; unreadable files give ``None``.
- :func:`build_dataset` maps the config (``data.name``, ``data.root``, ...) to one of them.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetNotFoundError",
    "InMemoryImages",
    "ImageFolderDataset",
    "IMG_EXTENSIONS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "DATASET_NAMES",
    "load_fashion_mnist",
    "load_torchvision",
    "build_dataset",
]


class DatasetNotFoundError(FileNotFoundError):
    """The data is not where it was looked for; the message says how to get it."""


# ----------------------------------------------------------------------------- in memory


class InMemoryImages(Dataset):
    """A small image set held as one uint8 tensor.

    Args:
        images: uint8 ``(N, C, H, W)``.
        labels: integer ``(N,)`` (stored as int64; -1 marks unlabeled images, e.g. STL-10).
        classes: class names, index = label.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"InMemoryImages(n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


def _canonical_split(split: str, allowed: Sequence[str], name: str) -> str:
    """Validate ``split``; 'val' means 'test' for sets that only have train/test.

    The alias lets evaluators ask every dataset for ``split='val'``.
    """
    split = str(split).lower()
    if split == "val" and "val" not in allowed and "test" in allowed:
        split = "test"
    if split not in allowed:
        raise ValueError(f"{name}: unknown split {split!r}; valid splits: {', '.join(allowed)}")
    return split


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

#: Where the Debian package ``dataset-fashion-mnist`` installs the 4 .gz files.
DEBIAN_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Default search order (``$BCSSL_FMNIST_DIR`` is checked first when set).
FASHION_MNIST_DIRS = (DEBIAN_FMNIST_DIR, "./data/fashion-mnist")

_FMNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: ubyte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: ubyte, 1 dim


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fmnist_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in ``directory``, raw or .gz, or None."""
    prefix = _FMNIST_PREFIX[split]
    images = _find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images is not None and labels is not None else None


def _fmnist_candidates(root: str | os.PathLike | None) -> list[Path]:
    """Directories to search, in order. torchvision's download layout is searched too."""
    if root is not None:
        bases = [Path(root)]
    else:
        env = os.environ.get("BCSSL_FMNIST_DIR")
        bases = ([Path(env)] if env else []) + [Path(d) for d in FASHION_MNIST_DIRS]
    out = []
    for b in bases:
        out += [b, b / "FashionMNIST" / "raw"]
    return out


def _read_idx(path: Path, magic: int, kind: str) -> np.ndarray:
    """Read one uint8 IDX file (raw or gzip); ValueError naming the file if it is malformed."""
    ndim = magic & 0xFF
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # bad gzip stream, truncated .gz
        raise ValueError(f"{path}: cannot read {kind} IDX file ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: file too short ({len(data)} bytes) for an IDX {kind} header of {header} bytes"
        )
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(
            f"{path}: bad magic number {got} (0x{got:08x}), expected {magic} (0x{magic:08x}) "
            f"for an IDX ubyte {kind} file"
        )
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says {kind} of shape {tuple(dims)} = {expected} bytes, "
            f"but the file has {len(data) - header} bytes of data"
        )
    # np.frombuffer over bytes is read-only; copy so torch.from_numpy gets a writable array.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fmnist_missing_message(searched: Sequence[Path], split: str, download_root: Path) -> str:
    prefix = _FMNIST_PREFIX[split]
    where = "\n  ".join(str(p) for p in searched)
    return (
        f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], "
        f"{prefix}-labels-idx1-ubyte[.gz]) not found. Searched:\n  {where}\n"
        "Get them with one of:\n"
        f"  sudo apt-get install dataset-fashion-mnist   (installs them into {DEBIAN_FMNIST_DIR})\n"
        f"  bcssl config data.download=true              (e.g. `bcssl pretrain ... data.download=true`;"
        f" downloads with torchvision into {download_root})\n"
        "or point data.root (or $BCSSL_FMNIST_DIR) at a directory that holds the IDX files."
    )


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", download: bool = False
) -> InMemoryImages:
    """Load Fashion-MNIST from its IDX files as uint8 ``(N, 1, 28, 28)``.

    ``root=None`` searches ``$BCSSL_FMNIST_DIR``, ``/usr/share/datasets/fashion-mnist``
    (Debian package ``dataset-fashion-mnist``), ``./data/fashion-mnist`` and takes the
    first that has the files; torchvision's ``<dir>/FashionMNIST/raw`` layout is also found.
    ``download=True`` fetches missing files with torchvision into ``root`` (default
    ``$BCSSL_FMNIST_DIR``, else ``./data/fashion-mnist``). ``split`` is 'train' or 'test' ('val' = 'test').

    Raises:
        DatasetNotFoundError: files missing (the message says how to get them).
        ValueError: a malformed file (named, with what was expected).
    """
    split = _canonical_split(split, ("train", "test"), "fashion_mnist")
    candidates = _fmnist_candidates(root)
    found = None
    for d in candidates:
        found = _fmnist_files(d, split)
        if found is not None:
            break
    download_root = Path(
        root if root is not None else os.environ.get("BCSSL_FMNIST_DIR") or FASHION_MNIST_DIRS[-1]
    )
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(download_root), train=(split == "train"), download=True)
        except Exception as e:  # network errors come in many types; report them as "not found"
            raise DatasetNotFoundError(
                f"downloading Fashion-MNIST into {download_root} failed: {e}\n"
                + _fmnist_missing_message(candidates, split, download_root)
            ) from e
        found = _fmnist_files(download_root / "FashionMNIST" / "raw", split)
    if found is None:
        raise DatasetNotFoundError(_fmnist_missing_message(candidates, split, download_root))
    images_path, labels_path = found
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, "images")
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, "labels")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels; expected the same count"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..9")
    return InMemoryImages(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


# ----------------------------------------------------------------------------- image folder

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_IMAGE_FOLDER_LAYOUT = (
    "expected an ImageFolder layout: <root>/<class_name>/<image>.jpg (one folder per class), "
    "optionally split as <root>/train/<class_name>/... and <root>/val/<class_name>/..."
)


def _scan_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
    """All files below ``directory`` with a matching extension, sorted, recursive.

    os.scandir gives the file type without a stat per entry, which keeps ImageNet-sized
    folders (1.3M files) quick to index; no image is opened here.
    """
    out: list[str] = []
    stack = [directory]
    while stack:
        d = stack.pop()
        subdirs = []
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    subdirs.append(e.path)
                elif e.name.lower().endswith(extensions):
                    out.append(e.path)
        stack.extend(sorted(subdirs, reverse=True))
    out.sort()
    return out


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<file>`` (torchvision ImageFolder layout), decoded lazily.

    Classes are the sorted sub-folder names (hidden ones skipped); files are found
    recursively below each class folder. Each image is decoded with PIL as RGB, resized so
    its shorter side is ``load_size`` (bicubic, antialiased) and center-cropped to
    ``load_size x load_size``: a fixed size so batches stack and the device-side multi-crop
    can crop from them. An unreadable or truncated file gives ``None`` from ``__getitem__``
    (the loader drops and counts it) instead of crashing a long run.

    If ``root/train`` and ``root/val`` both exist, ``root/<split>`` is used; otherwise
    ``root`` itself, whatever ``split`` says.

    ``decode_on_device=True`` (config ``data.decode_on_device``): ``__getitem__`` returns a
    JPEG file's raw bytes (1-D uint8; other formats are still decoded here), and the loader
    decodes each batch at once with :meth:`decode_batch` on the training device
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA), then resizes and crops it there. A file
    that fails to decode there is dropped and counted like an unreadable one.

    Raises:
        DatasetNotFoundError: missing root, no class folders, or no images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        load_size: int = 256,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        split: str = "train",
        decode_on_device: bool = False,
    ):
        if int(load_size) < 1:
            raise ValueError(f"load_size must be >= 1, got {load_size}")
        self.load_size = int(load_size)
        self.decode_on_device = bool(decode_on_device)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.split = split
        self.root = self._resolve_root(Path(root), split)

        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DatasetNotFoundError(f"no class folders in {self.root}; {_IMAGE_FOLDER_LAYOUT}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        # Paths are kept as one byte buffer + offsets rather than a list of str: with
        # DataLoader workers, touching millions of Python objects copies pages (refcounts)
        # in every forked worker; numpy buffers stay shared.
        chunks: list[bytes] = []
        targets: list[int] = []
        empty = []
        root_str = str(self.root)
        for idx, c in enumerate(self.classes):
            files = _scan_files(os.path.join(root_str, c), self.extensions)
            if not files:
                empty.append(c)
            chunks += [os.fsencode(os.path.relpath(f, root_str)) for f in files]
            targets += [idx] * len(files)
        if not chunks:
            raise DatasetNotFoundError(
                f"no images with extensions {', '.join(self.extensions)} in the class folders of "
                f"{self.root}; {_IMAGE_FOLDER_LAYOUT}"
            )
        if empty:
            warnings.warn(
                f"{self.root}: {len(empty)} class folder(s) without images (kept as classes so "
                f"label indices match the folder list): {', '.join(empty[:5])}"
                + (" ..." if len(empty) > 5 else ""),
                stacklevel=2,
            )
        lengths = np.fromiter((len(b) for b in chunks), dtype=np.int64, count=len(chunks))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._paths = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)

    @staticmethod
    def _resolve_root(root: Path, split: str) -> Path:
        if not root.is_dir():
            raise DatasetNotFoundError(f"image folder {root} does not exist; {_IMAGE_FOLDER_LAYOUT}")
        if (root / "train").is_dir() and (root / "val").is_dir():
            if not (root / split).is_dir():
                raise DatasetNotFoundError(
                    f"{root} has train/ and val/ but no {split}/; {_IMAGE_FOLDER_LAYOUT}"
                )
            return root / split
        return root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, load_size, load_size)``: the shape of every decoded image."""
        return (3, self.load_size, self.load_size)

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        """The file of item ``i``."""
        rel = self._paths[self._offsets[i] : self._offsets[i + 1]].tobytes()
        return os.path.join(str(self.root), os.fsdecode(rel))

    def load(self, i: int) -> torch.Tensor:
        """Decode item ``i`` to uint8 ``(3, load_size, load_size)``; raises on a bad file."""
        from PIL import Image

        s = self.load_size
        with Image.open(self.path(i)) as img:
            # JPEG: let libjpeg decode at a reduced scale that still covers s x s (much
            # faster for large photos; no effect on other formats).
            img.draft("RGB", (s, s))
            img = img.convert("RGB")
            w, h = img.size
            # Resize-shorter-side-then-center-crop in one step: resample only the central
            # square (float box keeps it exact) to s x s. PIL's resize is antialiased.
            m = min(w, h)
            box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
            img = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
            arr = np.array(img, dtype=np.uint8)  # copy: writable, (s, s, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def read(self, i: int) -> torch.Tensor:
        """Item ``i`` for device decoding: a JPEG file's bytes as 1-D uint8 (told by its magic
        number, not its name), any other format decoded by :meth:`load`; raises on a bad file."""
        with open(self.path(i), "rb") as f:
            data = f.read()
        if data[:3] == _JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return self.load(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        from PIL import Image

        try:
            image = self.read(i) if self.decode_on_device else self.load(i)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            # OSError covers PIL's UnidentifiedImageError and "image file is truncated".
            return None
        return image, int(self.targets[i])

    def decode_batch(self, items: Sequence[torch.Tensor], device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, list[int]]:
        """Decode a batch of :meth:`read` results on ``device`` -> ``(uint8 (N, 3, s, s), bad)``.

        JPEG bytes go through ONE ``torchvision.io.decode_jpeg(list, device=...)`` call (on CUDA
        a batched nvJPEG decode; if it fails, each image is retried alone to find the bad ones),
        then each is cut to its central square (at whole pixels; PIL's box is off by half a
        pixel when ``w - h`` is odd) and resized to ``s x s`` there (bicubic, antialiased, as
        PIL). Already decoded items are just moved. ``bad`` lists the positions in ``items``
        that failed to decode; the images of the others come in their order.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        out: list[torch.Tensor | None] = [None] * len(items)
        jpeg = [k for k, t in enumerate(items) if t.dim() == 1]
        for k, t in enumerate(items):
            if t.dim() == 3:
                out[k] = t.to(device, non_blocking=True)
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image io for TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg([items[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # a bad file fails the whole call: decode one by one
                decoded = []
                for k in jpeg:
                    try:
                        decoded.append(decode_jpeg(items[k], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(None)
        for k, img in zip(jpeg, decoded):
            out[k] = None if img is None else _center_square(img, self.load_size)
        bad = [k for k, img in enumerate(out) if img is None]
        good = [img for img in out if img is not None]
        if not good:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8, device=device), bad
        return torch.stack(good), bad

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, load_size={self.load_size}"
            + (", decode_on_device=True)" if self.decode_on_device else ")")
        )


_JPEG_MAGIC = b"\xff\xd8\xff"


def _center_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> its central square resized to (3, size, size), on the image's device."""
    import torch.nn.functional as F

    _, h, w = img.shape
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    sq = img[:, top:top + m, left:left + m]
    if m == size:
        return sq.contiguous()
    x = F.interpolate(sq[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- torchvision sets

_TV_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
_TV_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}
_TV_SIZES = {"cifar10": "~170 MB", "cifar100": "~170 MB", "stl10": "~2.6 GB"}
DEFAULT_DATA_ROOT = "./data"


def load_torchvision(
    name: str, root: str | os.PathLike | None = None, split: str = "train", download: bool = False
) -> InMemoryImages:
    """CIFAR-10/100 or STL-10 via torchvision's in-memory arrays -> :class:`InMemoryImages`.

    ``root`` defaults to ``./data`` (torchvision puts each set in its own sub-folder).
    Splits: cifar 'train'/'test'; stl10 'train'/'test'/'unlabeled'/'train+unlabeled'
    (unlabeled images have label -1). 'val' means 'test'.

    Raises:
        DatasetNotFoundError: data missing and ``download`` is False (says to set
            ``data.download=true``).
    """
    import torchvision.datasets as tvd

    name = name.lower()
    if name not in _TV_SPLITS:
        raise ValueError(f"unknown torchvision dataset {name!r}; valid: {', '.join(_TV_SPLITS)}")
    split = _canonical_split(split, _TV_SPLITS[name], name)
    root = str(root if root is not None else DEFAULT_DATA_ROOT)
    missing = DatasetNotFoundError(
        f"{name} ({split}) not found under {root} (expected {os.path.join(root, _TV_FOLDERS[name])}). "
        f"Set data.download=true (e.g. `bcssl pretrain ... data.name={name} data.download=true`) "
        f"to download it ({_TV_SIZES[name]}) with torchvision, or point data.root at the folder "
        f"that contains {_TV_FOLDERS[name]}/."
    )
    # torchvision checks the files itself and raises a bare RuntimeError when they are missing.
    if not download and not os.path.isdir(os.path.join(root, _TV_FOLDERS[name])):
        raise missing
    try:
        if name == "stl10":
            ds = tvd.STL10(root, split=split, download=download)
            data, labels = ds.data, ds.labels  # (N, 3, 96, 96) view, labels -1 if unlabeled
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=(split == "train"), download=download)
            data, labels = ds.data.transpose(0, 3, 1, 2), ds.targets  # HWC -> CHW
    except RuntimeError as e:
        if download:
            raise
        raise missing from e
    images = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    return InMemoryImages(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64), ds.classes)


# ----------------------------------------------------------------------------- factory

DATASET_NAMES = ("fashion_mnist", "fashion_mnist_canvas", "image_folder", "cifar10", "cifar100", "stl10")


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    load_size: int = 256,
    decode_on_device: bool = False,
    canvas=None,
) -> Dataset:
    """Dataset for config ``data.name`` / ``data.root`` / ``data.download``.

    ``name``: fashion_mnist | fashion_mnist_canvas | image_folder | cifar10 | cifar100 | stl10
    ('-' is read as '_'). ``canvas`` (``data.canvas``: size, scale, clutter, seed) applies to
    fashion_mnist_canvas (:mod:`bcssl.data.canvas`), whose ``root`` is Fashion-MNIST's.
    ``load_size`` and ``decode_on_device`` (``data.decode_on_device``: JPEG bytes, decoded per
    batch by the loader on its ``decode_device``) apply to image_folder only; image_folder
    needs ``root``.

    Raises:
        ValueError: unknown name (lists the valid ones), or image_folder without root.
        DatasetNotFoundError: the data is not there (the message says how to get it).
    """
    key = str(name).lower().replace("-", "_")
    if key == "fashion_mnist":
        return load_fashion_mnist(root, split=split, download=download)
    if key == "fashion_mnist_canvas":
        from .canvas import load_fashion_mnist_canvas

        if download:  # fetch the source items first; the canvases are drawn from them
            load_fashion_mnist(root, split=split, download=True)
        return load_fashion_mnist_canvas(root, split, **dict(canvas or {}))
    if key == "image_folder":
        if root is None:
            raise ValueError("data.name=image_folder needs data.root (the folder of class folders)")
        return ImageFolderDataset(root, load_size=load_size, split=split, decode_on_device=decode_on_device)
    if key in _TV_SPLITS:
        return load_torchvision(key, root, split=split, download=download)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def dataset_from_config(data_cfg, split: str) -> Dataset:
    """``split`` of a run's ``data.*`` dataset, decoded on the CPU (what the evaluations read)."""
    return build_dataset(data_cfg.name, root=data_cfg.root, split=split, download=data_cfg.download,
                         load_size=data_cfg.load_size, canvas=data_cfg.get("canvas"))


def train_and_eval_sets(data_cfg) -> dict[str, Dataset]:
    """``{data.split: ..., data.eval_split: ...}`` (one entry when they are the same split)."""
    return {split: dataset_from_config(data_cfg, split) for split in dict.fromkeys((data_cfg.split,
                                                                                  data_cfg.eval_split))}
