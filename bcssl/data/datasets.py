"""Datasets of uint8 images: in-memory sets for the batched device path, image files for the workers.

Every dataset here returns ``(image, label)`` with ``image`` a uint8 tensor ``(C, H, W)``
(C = 1 for grayscale sets, 3 otherwise) and ``label`` an int (-1: unlabelled), and exposes
``classes``, ``num_classes`` and ``__len__``.

- :class:`InMemoryImages` holds small fixed-size sets (Fashion-MNIST, CIFAR, STL-10) as one
  tensor; :class:`~bcssl.data.loader.BatchLoader` indexes it directly (no DataLoader) and the
  whole multi-crop, geometry included, runs batched on the training device
  (``bcssl.data.multicrop``). That is DINO's crop there: each image IS the original, so every
  box is sampled over the whole image, and crops of 28-96 px images are upsampled (no antialias
  is needed).
- :class:`ImageFolderDataset` decodes files lazily (ImageNet-style class folders, a flat folder,
  or a file list). For pre-training, each image's crop boxes are sampled over the original image
  and cut where it is decoded, in the loader's workers (:mod:`bcssl.data.crops`); the photometric
  part stays batched on the device. For evaluation it gives DINO's Resize(256) + CenterCrop(224).
  Unreadable files give :class:`~bcssl.data.crops.Unreadable`; the loader drops and counts them.
- :func:`pretraining_dataset` / :func:`dataset_from_config` map a run's config to the set it
  pre-trains on / the labelled set its evaluations read.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL.Image import DecompressionBombError
from torch.utils.data import Dataset

from .crops import DRAFT_MARGIN, CropItem, Unreadable, draft_pixels, make_crop_item, open_rgb

log = logging.getLogger("bcssl")

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
    "pretraining_dataset",
    "dataset_from_config",
    "train_and_eval_sets",
    "eval_image_size",
    "evaluation_labels_missing",
    "probe_readable",
    "UnlabelledDataError",
    "UnreadableDataError",
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
    "optionally split as <root>/train/<class_name>/... and <root>/val/<class_name>/..., or, for "
    "pre-training, a flat folder of images or data.file_list"
)

#: What PIL raises for a file it cannot decode (OSError covers UnidentifiedImageError and
#: "image file is truncated"; DecompressionBombError: more than twice Image.MAX_IMAGE_PIXELS).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, DecompressionBombError)


def _scan_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
    """All files below ``directory`` with a matching extension, sorted, recursive.

    os.scandir gives the file type without a stat per entry, which keeps ImageNet-sized
    folders (1.3M files) quick to index; no image is opened here. Only regular files (and links
    to them) count: a FIFO named x.jpg would block a worker forever.
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
                elif e.name.lower().endswith(extensions) and e.is_file():
                    out.append(e.path)
        stack.extend(sorted(subdirs, reverse=True))
    out.sort()
    return out


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _split_root(root: Path, split: str) -> Path:
    """``root/<split>`` when root has both train/ and val/, else root itself."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist; {_IMAGE_FOLDER_LAYOUT}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        if not (root / split).is_dir():
            raise DatasetNotFoundError(f"{root} has train/ and val/ but no {split}/; {_IMAGE_FOLDER_LAYOUT}")
        return root / split
    return root


class ImageFolderDataset(Dataset):
    """Image files, decoded lazily with PIL: class folders, a flat folder, or a file list.

    Layouts (``root/train`` and ``root/val`` both present: ``root/<split>`` is used):

    - ``root/<class>/<file>`` (torchvision ImageFolder): classes are the sorted sub-folder names
      (hidden ones skipped), files are found recursively below each; labels = class indices.
    - a flat folder (images, no sub-folders): unlabelled, every label -1, ``classes == []``.
    - ``file_list`` (config ``data.file_list``): a text file with one image path per line,
      relative to ``root`` (absolute paths work too; blank lines and ``#`` comments are skipped):
      unlabelled. A relative list path is read from the current directory, else from ``root``.

    Pre-training needs no labels; evaluations need a labelled set (:attr:`labelled`).

    Items:

    - ``dataset[i]`` (evaluation): DINO's evaluation transform of the ORIGINAL image,
      ``Resize(resize_size, bicubic)`` + ``CenterCrop(crop_size)`` (torchvision functional on the
      PIL image, as facebookresearch/dino ``eval_knn.py``/``eval_linear.py``): uint8
      ``(3, crop_size, crop_size)`` and the label. ``load_size=s`` means ``resize = crop = s``.
    - :meth:`crop_item` (pre-training): the multi-crops of the original image
      (:mod:`bcssl.data.crops`), for the loader's workers.

    A file that cannot be decoded gives :class:`~bcssl.data.crops.Unreadable` (path and reason)
    instead of crashing a long run; the loader drops and counts it. Images are converted to RGB
    (CMYK, grayscale, palette and alpha as torchvision's loader; 16-bit grayscale scaled to 8
    bits); large JPEGs are decoded at reduced scale (:func:`bcssl.data.crops.open_rgb`).

    ``decode_on_device=True`` (config ``data.decode_on_device``, pre-training): :meth:`read`
    returns a JPEG file's raw bytes (other formats are decoded here, at full size), and the
    loader decodes each batch on the training device (:meth:`decode_batch`: nvJPEG on CUDA),
    then cuts the same crop boxes there.

    Raises:
        DatasetNotFoundError: missing root or list, or no images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resize_size: int = 256,
        crop_size: int = 224,
        *,
        load_size: int | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        split: str = "train",
        file_list: str | os.PathLike | None = None,
        decode_on_device: bool = False,
    ):
        if load_size is not None:
            resize_size = crop_size = load_size
        if int(resize_size) < 1 or int(crop_size) < 1:
            raise ValueError(f"resize and crop sizes must be >= 1, got {resize_size}, {crop_size}")
        self.resize_size, self.crop_size = int(resize_size), int(crop_size)
        self.decode_on_device = bool(decode_on_device)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.split = split
        self.file_list = None
        if file_list is not None:
            self.root = Path(root)
            if not self.root.is_dir():
                raise DatasetNotFoundError(f"data.root {self.root} (the folder data.file_list paths are relative "
                                           "to) does not exist")
            self.file_list = self._find_list(Path(file_list), self.root)
            rel = self._read_list(self.file_list)
            self.classes, targets = [], [-1] * len(rel)
        else:
            self.root = _split_root(Path(root), split)
            self.classes = _class_folders(self.root)
            rel, targets = self._scan(self.root, self.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # Paths are kept as one byte buffer + offsets rather than a list of str: with
        # DataLoader workers, touching millions of Python objects copies pages (refcounts)
        # in every forked worker; numpy buffers stay shared.
        chunks = [os.fsencode(p) for p in rel]
        lengths = np.fromiter((len(b) for b in chunks), dtype=np.int64, count=len(chunks))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._paths = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self.targets = np.asarray(targets, dtype=np.int64)

    def _scan(self, root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
        root_str = str(root)
        if not classes:  # a flat folder: unlabelled
            files = _scan_files(root_str, self.extensions)
            if not files:
                raise DatasetNotFoundError(f"no images with extensions {', '.join(self.extensions)} in "
                                           f"{root}; {_IMAGE_FOLDER_LAYOUT}")
            return [os.path.relpath(f, root_str) for f in files], [-1] * len(files)
        rel: list[str] = []
        targets: list[int] = []
        empty = []
        for idx, c in enumerate(classes):
            files = _scan_files(os.path.join(root_str, c), self.extensions)
            if not files:
                empty.append(c)
            rel += [os.path.relpath(f, root_str) for f in files]
            targets += [idx] * len(files)
        if not rel:
            raise DatasetNotFoundError(
                f"no images with extensions {', '.join(self.extensions)} in the class folders of "
                f"{root}; {_IMAGE_FOLDER_LAYOUT}")
        if empty:
            warnings.warn(
                f"{root}: {len(empty)} class folder(s) without images (kept as classes so "
                f"label indices match the folder list): {', '.join(empty[:5])}"
                + (" ..." if len(empty) > 5 else ""),
                stacklevel=3,
            )
        loose = [e.name for e in os.scandir(root_str) if e.name.lower().endswith(self.extensions) and e.is_file()]
        if loose:  # a flat folder with a stray sub-folder would otherwise silently lose its images
            log.warning("%s: %d image(s) directly in the folder are not used: it has sub-folders (%s), which are "
                        "read as class folders", root, len(loose),
                        ", ".join(classes[:3]) + (" ..." if len(classes) > 3 else ""))
        return rel, targets

    @staticmethod
    def _find_list(path: Path, root: Path) -> Path:
        if path.is_file():
            return path
        if not path.is_absolute() and (root / path).is_file():
            return root / path
        raise DatasetNotFoundError(f"data.file_list {path} not found (looked in the current directory and in "
                                   f"data.root {root}); expected a text file with one image path per line, "
                                   "relative to data.root")

    @staticmethod
    def _read_list(path: Path) -> list[str]:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetNotFoundError(f"data.file_list {path} cannot be read as text ({e})") from None
        rel = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
        if not rel:
            raise DatasetNotFoundError(f"data.file_list {path} lists no images; expected one path per line, "
                                       "relative to data.root")
        return rel

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """Whether items carry class labels (class folders) or -1 (flat folder, file list)."""
        return bool(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, crop_size, crop_size)``: the shape of every evaluation item."""
        return (3, self.crop_size, self.crop_size)

    @property
    def eval_transform(self) -> str:
        """The evaluation preprocessing, for feature-cache keys."""
        return f"resize{self.resize_size}-centercrop{self.crop_size}"

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        """The file of item ``i``."""
        rel = self._paths[self._offsets[i] : self._offsets[i + 1]].tobytes()
        return os.path.join(str(self.root), os.fsdecode(rel))

    def open(self, i: int, **draft):
        """Item ``i`` as an RGB PIL image and the file's (width, height); raises on a bad file."""
        return open_rgb(self.path(i), **draft)

    def load(self, i: int) -> torch.Tensor:
        """Item ``i`` with the evaluation transform -> uint8 ``(3, crop, crop)``; raises on a bad file."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img, _ = self.open(i, min_side=round(DRAFT_MARGIN * self.resize_size))
        img = TF.center_crop(TF.resize(img, self.resize_size, InterpolationMode.BICUBIC), self.crop_size)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Unreadable:
        try:
            return self.load(i), int(self.targets[i])
        except _DECODE_ERRORS as e:
            return Unreadable(self.path(i), _reason(e))

    def crop_item(self, i: int, seed: int, cfg) -> CropItem | Unreadable:
        """Item ``i``'s pre-training crops (``cfg``: a ``MultiCropConfig``), boxes from ``seed``
        (:func:`~bcssl.data.crops.crop_seed`), or :class:`~bcssl.data.crops.Unreadable`."""
        try:
            img, size = self.open(i, min_pixels=draft_pixels(cfg))
            return make_crop_item(img, size, seed, cfg, int(self.targets[i]))
        except _DECODE_ERRORS as e:
            return Unreadable(self.path(i), _reason(e))

    def read(self, i: int) -> torch.Tensor | Unreadable:
        """Item ``i`` for device decoding: a JPEG file's bytes as 1-D uint8 (told by its magic
        number, not its name), any other format decoded here as uint8 ``(3, H, W)`` at full size."""
        try:
            with open(self.path(i), "rb") as f:
                data = f.read()
            if data[:3] == _JPEG_MAGIC:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img, _ = self.open(i)
            return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        except _DECODE_ERRORS as e:
            return Unreadable(self.path(i), _reason(e))

    @staticmethod
    def decode_batch(items: Sequence[torch.Tensor], device: torch.device | str = "cpu"
                     ) -> list[torch.Tensor | str]:
        """Decode a batch of :meth:`read` results on ``device``: uint8 ``(3, H, W)`` per item, or
        the reason it failed.

        JPEG bytes go through ONE ``torchvision.io.decode_jpeg(list, device=...)`` call (on CUDA
        a batched nvJPEG decode; if it fails, each image is retried alone to find the bad ones);
        already decoded items are just moved.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        out: list = [t.to(device, non_blocking=True) if t.dim() == 3 else None for t in items]
        jpeg = [k for k, t in enumerate(items) if t.dim() == 1]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image io for TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg([items[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # a bad file fails the whole call: decode one by one
                decoded = []
                for k in jpeg:
                    try:
                        decoded.append(decode_jpeg(items[k], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError as e:
                        decoded.append(f"RuntimeError: {str(e).splitlines()[0]}")
        for k, img in zip(jpeg, decoded):
            out[k] = img
        return out

    def __repr__(self) -> str:
        source = f"file_list={str(self.file_list)!r}, " if self.file_list else ""
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, {source}n={len(self)}, "
            f"num_classes={self.num_classes}, eval={self.eval_transform}"
            + (", decode_on_device=True)" if self.decode_on_device else ")")
        )


_JPEG_MAGIC = b"\xff\xd8\xff"


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


class UnreadableDataError(ValueError):
    """None of the files tried could be decoded: training would only skip them."""


def probe_readable(dataset, tries: int = 32) -> None:
    """Raise :class:`UnreadableDataError` when none of ``tries`` files spread over ``dataset``
    (all of them when it has no more) can be decoded: such a folder would "train" empty epochs.

    The files tried depend only on the dataset's length, so every process decides the same.
    """
    n = len(dataset)
    picks = sorted(set(np.linspace(0, n - 1, min(n, tries)).round().astype(int).tolist())) if n else []
    first = None
    for i in picks:
        try:
            dataset.open(i, min_side=8)
            return
        except _DECODE_ERRORS as e:
            first = first or f"{dataset.path(i)}: {_reason(e)}"
    what = f"any of its {n} images" if len(picks) == n else f"any of {len(picks)} images spread over its {n}"
    raise UnreadableDataError(f"{getattr(dataset, 'root', 'the dataset')}: could not decode {what} "
                              f"(first: {first}); check data.root / data.file_list")


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

DATASET_NAMES = ("fashion_mnist", "fashion_mnist_canvas", "image_folder", "webdataset", "cifar10", "cifar100",
                 "stl10")


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    *,
    file_list: str | os.PathLike | None = None,
    resize_size: int = 256,
    crop_size: int = 224,
    load_size: int | None = None,
    decode_on_device: bool = False,
    canvas=None,
) -> Dataset:
    """Dataset for config ``data.name`` / ``data.root`` / ``data.download``.

    ``name``: fashion_mnist | fashion_mnist_canvas | image_folder | cifar10 | cifar100 | stl10
    ('-' is read as '_'). ``canvas`` (``data.canvas``: size, scale, clutter, seed) applies to
    fashion_mnist_canvas (:mod:`bcssl.data.canvas`), whose ``root`` is Fashion-MNIST's.
    image_folder only (it needs ``root``): ``file_list`` (``data.file_list``), the evaluation
    transform ``resize_size`` / ``crop_size`` (``load_size`` sets both) and ``decode_on_device``
    (``data.decode_on_device``).

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
            raise ValueError("data.name=image_folder needs data.root (a folder of images or of class folders)")
        return ImageFolderDataset(root, resize_size, crop_size, load_size=load_size, split=split,
                                  file_list=file_list, decode_on_device=decode_on_device)
    if key in _TV_SPLITS:
        return load_torchvision(key, root, split=split, download=download)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def pretraining_dataset(cfg) -> Dataset:
    """The ``data.split`` set a run pre-trains on (``data.*``: a flat folder or file list is fine;
    ``webdataset``: the tar shards of ``data.urls``, :class:`~bcssl.data.shards.TarShards`)."""
    d = cfg.data
    if _is_shards(d):
        from .shards import TarShards

        if not d.urls:
            raise ValueError("data.name=webdataset needs data.urls (e.g. data.urls='/data/train-{000000..000127}.tar')")
        return TarShards(d.urls, d.num_samples, d.shuffle_buffer)
    return build_dataset(d.name, root=d.root, split=d.split, download=d.download, file_list=d.file_list,
                         decode_on_device=d.decode_on_device, canvas=d.canvas)


class UnlabelledDataError(ValueError):
    """An evaluation was asked of a set without class labels; the message says how to give one."""


def _sections(cfg):
    """``(data, eval.data)`` of a run config; a bare ``data`` section gets eval.data's defaults."""
    if "data" in cfg:
        return cfg.data, cfg.eval.data
    from bcssl.config.schema import EvalDataConfig

    return cfg, EvalDataConfig()


def _is_folder(data) -> bool:
    """Image files: an image folder, or tar shards, whose evaluations read a labelled image folder."""
    return str(data.name).lower().replace("-", "_") in ("image_folder", "webdataset")


def _is_shards(data) -> bool:
    return str(data.name).lower().replace("-", "_") == "webdataset"


def evaluation_labels_missing(cfg) -> str | None:
    """Why the evaluations of ``cfg`` would have no labels (a flat folder), or None. Cheap: looks
    for class folders, opens no image; a missing folder is left for the evaluation to report."""
    data, ev = _sections(cfg)
    if not _is_folder(data):
        return None
    if _is_shards(data) and not ev.root:
        return _SHARDS_NEED_EVAL_ROOT
    root = ev.root or data.root
    for split in dict.fromkeys((data.split, data.eval_split)):
        try:
            folder = _split_root(Path(root), split)
            if not _class_folders(folder):
                return _unlabelled_message(folder, split, bool(ev.root))
        except (DatasetNotFoundError, OSError, TypeError):
            return None
    return None


_SHARDS_NEED_EVAL_ROOT = ("evaluations of a run pre-trained on tar shards (data.name=webdataset) read a labelled image "
                          "folder: pass eval.data.root=DIR (<dir>/<class>/<image>, optionally with train/ and val/)")


def _unlabelled_message(folder, split: str, from_eval_root: bool) -> str:
    where = "eval.data.root" if from_eval_root else "data.root"
    return (f"evaluations need class labels, but the {split} images of {where} ({folder}) are a flat folder "
            "without class folders; pass a labelled ImageFolder (<dir>/<class>/<image>, optionally with "
            "train/ and val/) as eval.data.root=DIR")


def dataset_from_config(cfg, split: str) -> Dataset:
    """``split`` of the labelled set a run's evaluations read, decoded on the CPU.

    ``cfg``: the run's config (a bare ``data`` section works too, with eval.data's defaults).
    Image folders: ``eval.data.root`` (else ``data.root``; ``data.file_list`` is the pre-training
    set only; tar shards: ``eval.data.root``), with DINO's evaluation transform ``Resize(eval.data.resize_size)`` +
    ``CenterCrop(eval.data.crop_size)`` of the original image. Other sets: as pre-training.

    Raises:
        UnlabelledDataError: an image folder without class folders.
    """
    data, ev = _sections(cfg)
    if not _is_folder(data):
        return build_dataset(data.name, root=ev.root or data.root, split=split, download=data.download,
                             canvas=data.get("canvas"))
    if _is_shards(data) and not ev.root:
        raise UnlabelledDataError(_SHARDS_NEED_EVAL_ROOT)
    ds = build_dataset("image_folder", root=ev.root or data.root, split=split, resize_size=ev.resize_size,
                       crop_size=ev.crop_size)
    if not ds.labelled:
        raise UnlabelledDataError(_unlabelled_message(ds.root, split, bool(ev.root)))
    return ds


def train_and_eval_sets(cfg) -> dict[str, Dataset]:
    """``{data.split: ..., data.eval_split: ...}`` of :func:`dataset_from_config` (one entry when
    they are the same split)."""
    data, _ = _sections(cfg)
    return {split: dataset_from_config(cfg, split) for split in dict.fromkeys((data.split, data.eval_split))}


def eval_image_size(cfg) -> int:
    """The side of the images the evaluations feed the backbone: ``eval.data.crop_size`` for image
    folders (DINO's CenterCrop(224), whatever the pre-training crops), ``crops.global_size`` for the
    small in-memory sets (their 28-96 px images are resized up to it, as the training crops were)."""
    data, ev = _sections(cfg)
    return int(ev.crop_size) if _is_folder(data) else int(cfg.crops.global_size)
