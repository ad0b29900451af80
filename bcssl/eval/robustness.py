"""Robustness evaluation (paper Table 5): ImageNet-C mCE, ImageNet-A / -R / -Sketch top-1, and
the same 15 corruptions x 5 severities made on the fly for any dataset.

Corruption package
------------------
The corruptions come from ``imagecorruptions-imaug`` (import name ``imagecorruptions``): the
maintained fork of bethgelab's ``imagecorruptions`` (Michaelis et al. 2019), the package the
paper names. It is the ImageNet-C code of Hendrycks & Dietterich adapted to any image size
(>= 32 px): fog's plasma map, frost's texture and the elastic displacements scale with the
image, and ImageMagick's motion blur (used for ``motion_blur`` and ``snow``) is re-implemented
as a one-sided Gaussian-weighted line kernel. The fork fixes what broke the original on current
packages (``pkg_resources`` gone from setuptools >= 81; ``np.float_`` and scikit-image's
``multichannel`` removed) and takes a ``seed`` for the two corruptions that do not draw from
NumPy's global RNG (``impulse_noise``, ``glass_blur``).

Rejected: ``imagecorruptions`` 1.1.2 (does not import: ``pkg_resources``; ``glass_blur`` and
``fog`` fail under NumPy 2 / scikit-image >= 0.19) and ``corrupt-tta`` 0.1.7 (a lighter port
with no numba, but it departs from ImageNet-C where it matters here: ``fog`` ignores the
per-severity ``wibbledecay``; its motion blur is a uniform symmetric line that ignores sigma,
so ``motion_blur`` severities 2-4 are identical; ``elastic_transform`` keeps the absolute
224-px parameters, so on 32-px images severities 1-2 are ~4x stronger than severity 5; and
``impulse_noise`` cannot be seeded). The cost of the choice is numba (+ llvmlite), which
JIT-compiles ``glass_blur`` once per process (~3 s).

Conventions
-----------
- Errors are fractions in [0, 1]; ``top1`` is a percentage; ``ce`` / ``mce`` are AlexNet-
  normalised percentages as in the paper's tables (100 = AlexNet's robustness).
- Labels and predictions are class indices of the classifier. For ImageNet datasets the class
  index is the position of the wnid in the sorted 1000-wnid list
  (:data:`bcssl.eval.imagenet_subsets.IMAGENET_WNIDS`).
- Every image gets its own corruption seed, derived from ``(seed, corruption, severity, image
  index)``: results do not depend on the batch size.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bcssl.engine.amp import autocast as amp_autocast
from bcssl.eval.features import eval_preprocess, linear_features_of
from bcssl.eval.registry import Evaluation
from bcssl.eval.imagenet_subsets import (
    IMAGENET_A_INDICES,
    IMAGENET_R_INDICES,
    IMAGENET_WNIDS,
    WNID_TO_INDEX,
    is_wnid,
)

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "ALEXNET_ERR",
    "MIN_SIDE",
    "FOLDER_KINDS",
    "corrupt",
    "corruption_errors",
    "evaluate_corruptions",
    "evaluate_folder",
    "robustness_report_rows",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
"""The 15 ImageNet-C corruptions (noise, blur, weather, digital), in the paper's order."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
"""AlexNet's ImageNet-C top-1 error per corruption, *mean over the 5 severities* (docs/recipe.md section 5;
Hendrycks & Dietterich 2019). So sum_s err_AlexNet(c, s) = 5 * ALEXNET_ERR[c]."""

MIN_SIDE = 32
"""The corruption code needs both sides >= 32 px; smaller images are upsampled first."""

FOLDER_KINDS = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_c")
_BENCHMARK_NAMES = {"imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
                    "imagenet_sketch": "ImageNet-Sketch", "imagenet_c": "ImageNet-C",
                    "corruptions": "Corruptions"}
# Corruptions whose randomness does not come from NumPy's global RNG: they take a seed.
_SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")


# ----------------------------------------------------------------------------- corruptions


def _import_package():
    try:
        import imagecorruptions
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "corruptions need the package 'imagecorruptions-imaug' (import name imagecorruptions): "
            "pip install imagecorruptions-imaug"
        ) from e
    return imagecorruptions


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")


def _check_severity(severity) -> None:
    if isinstance(severity, (bool, str)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def _image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """A 32-bit seed for one image, stable across NumPy versions and batchings."""
    ss = np.random.SeedSequence([int(seed) % 2**63, CORRUPTIONS.index(name), int(severity), int(index)])
    return int(ss.generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def _numpy_global_seed(seed: int):
    """Seed NumPy's legacy global RNG (what the corruption code draws from) and restore it after.
    Not thread-safe: the global RNG is process-wide."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _upsample_small(images: torch.Tensor) -> torch.Tensor:
    """Bicubic upsampling so that the shorter side is MIN_SIDE (aspect kept; uint8 out)."""
    h, w = images.shape[-2:]
    if min(h, w) >= MIN_SIDE:
        return images
    scale = MIN_SIDE / min(h, w)
    size = (max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale)))
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            start_index: int = 0) -> torch.Tensor:
    """Apply one ImageNet-C corruption to a batch of uint8 images.

    Args:
        images: uint8 ``(N, C, H, W)`` with C = 1 or 3 (or ``(C, H, W)`` for one image).
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: with ``start_index + i``, the corruption and severity, fixes image ``i``'s noise.
        start_index: the dataset index of ``images[0]`` (so a batch gives the same result as
            the same images inside a larger batch).

    Returns:
        uint8 ``(N, 3, H', W')`` on the input's device: grayscale becomes 3 channels (the
        corruptions are defined on RGB and some, e.g. frost, add colour); images with a side
        < 32 px are first upsampled bicubically so that the shorter side is 32, and stay at
        that size (``H' = W' = 32`` for 28x28 input); otherwise ``H', W' = H, W``.

    NumPy's global RNG, which the package uses, is seeded per image and restored afterwards.
    """
    _check_name(name)
    _check_severity(severity)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    single = images.dim() == 3
    if single:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    package = _import_package()
    device = images.device
    x = _upsample_small(images.cpu())
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    arrays = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)
    out = np.empty_like(arrays)
    for i, img in enumerate(arrays):
        s = _image_seed(seed, name, severity, start_index + i)
        kwargs = {"seed": s} if name in _SEEDED_BY_ARGUMENT else {}
        with _numpy_global_seed(s), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy/skimage deprecation chatter from the package
            res = package.corrupt(img, severity=int(severity), corruption_name=name, **kwargs)
        res = np.asarray(res)
        if res.shape != img.shape:  # defensive: the package keeps the shape for 3-channel input
            raise RuntimeError(f"{name} changed the image shape {img.shape} -> {res.shape}")
        out[i] = res
    result = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(device)
    return result[0] if single else result


# ----------------------------------------------------------------------------- metrics


def corruption_errors(err_table: Mapping[str, Sequence[float]]) -> dict:
    """ImageNet-C corruption errors from a table ``{corruption: [err(s=1), ..., err(s=5)]}``.

    CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s) with sum_s err_AlexNet(c, s) =
    5 * ALEXNET_ERR[c] (the published numbers are means over severities).

    Returns ``{"ce": {c: 100 * CE_c}, "mce": mean_c of those, "mean_error": mean of all entries
    (unnormalised, fraction), "mean_error_by_corruption": {c: mean_s err}, "complete": all 15}``.
    """
    if not err_table:
        raise ValueError("empty error table")
    ce, by_c, everything = {}, {}, []
    for c, errs in err_table.items():
        if c not in ALEXNET_ERR:
            raise ValueError(f"no AlexNet reference for corruption {c!r}; known: {', '.join(CORRUPTIONS)}")
        errs = [float(e) for e in errs]
        if len(errs) != len(SEVERITIES):
            raise ValueError(f"{c}: CE needs the errors of all 5 severities, got {len(errs)}")
        if not all(0.0 <= e <= 1.0 for e in errs):
            raise ValueError(f"{c}: errors must be fractions in [0, 1], got {errs}")
        ce[c] = 100.0 * sum(errs) / (len(SEVERITIES) * ALEXNET_ERR[c])
        by_c[c] = sum(errs) / len(errs)
        everything += errs
    return {
        "ce": ce,
        "mce": sum(ce.values()) / len(ce),
        "mean_error": sum(everything) / len(everything),
        "mean_error_by_corruption": by_c,
        "complete": set(ce) == set(CORRUPTIONS),
    }


# ----------------------------------------------------------------------------- evaluation core


def _module_device(m: nn.Module, default: torch.device) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else default


class _Predictor:
    """argmax of ``classifier(backbone(preprocess(x)))``, optionally over a subset of classes."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, *, size: int, mean, std,
                 device, class_indices: Sequence[int] | None = None, amp: str = "none"):
        self.backbone, self.classifier = backbone, classifier
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.clf_device = _module_device(classifier, self.device)
        self.amp = amp
        self.subset = None
        if class_indices is not None:
            idx = torch.as_tensor(list(class_indices), dtype=torch.long)
            if idx.numel() == 0:
                raise ValueError("class_indices is empty")
            self.subset = idx

    def __enter__(self):
        self._modes = (self.backbone.training, self.classifier.training)
        self.backbone.eval()
        self.classifier.eval()
        return self

    def __exit__(self, *exc):
        self.backbone.train(self._modes[0])
        self.classifier.train(self._modes[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = eval_preprocess(images.to(self.device, non_blocking=True), self.size, self.mean, self.std)
        with amp_autocast(self.amp, self.device):
            feats = linear_features_of(self.backbone)[0](x)  # what the linear probe was trained on
        logits = self.classifier(feats.float().to(self.clf_device)).float()
        if self.subset is None:
            return logits.argmax(1).cpu()
        subset = self.subset.to(logits.device)
        if int(subset.max()) >= logits.shape[1]:
            raise ValueError(f"class subset index {int(subset.max())} >= the classifier's "
                             f"{logits.shape[1]} classes")
        return subset[logits.index_select(1, subset).argmax(1)].cpu()


def _error(predict: _Predictor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    wrong = n = 0
    for images, labels in batches:
        if len(labels) == 0:
            continue
        pred = predict(images)
        wrong += int((pred != labels.long().cpu()).sum())
        n += len(labels)
    if n == 0:
        raise ValueError("no images to evaluate")
    return wrong / n, n


def _tensor_batches(images, labels, batch_size) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(labels), batch_size):
        yield start, images[start:start + batch_size], labels[start:start + batch_size]


def _check_table_args(corruptions, severities):
    corruptions = tuple(corruptions)
    severities = tuple(int(s) for s in severities)
    if not corruptions or not severities:
        raise ValueError("need at least one corruption and one severity")
    for c in corruptions:
        _check_name(c)
    for s in severities:
        _check_severity(s)
    if len(set(corruptions)) != len(corruptions) or len(set(severities)) != len(severities):
        raise ValueError("corruptions and severities must not repeat")
    return corruptions, severities


def _summarise_table(benchmark: str, corruptions, severities, errors: dict, *, imagenet: bool,
                     clean_error: float | None, n_images: int, seed: int | None) -> dict:
    cells = [e for c in corruptions for e in errors[c]]
    out = {
        "benchmark": benchmark,
        "corruptions": list(corruptions),
        "severities": list(severities),
        "errors": {c: list(errors[c]) for c in corruptions},
        "clean_error": clean_error,
        "mean_error": sum(cells) / len(cells),
        "mean_error_by_corruption": {c: sum(errors[c]) / len(errors[c]) for c in corruptions},
        "n_images": n_images,
        "seed": seed,
        "normalised_by_alexnet": False,
    }
    if imagenet:
        if tuple(severities) == SEVERITIES:
            m = corruption_errors(out["errors"])
            out.update(normalised_by_alexnet=True, ce=m["ce"], mce=m["mce"], mce_complete=m["complete"])
        else:
            out["note"] = "mCE needs all 5 severities; only the unnormalised mean error is given"
    return out


def subset_indices(n: int, limit: int | None, sampling: str) -> range | list[int]:
    """The items a ``limit`` keeps of ``n``: all (``limit`` None or >= n), the ``first`` ones, or
    ``strided`` (evenly spaced over the whole set: every class of a class-sorted folder)."""
    if limit is None or limit >= n:
        return range(n)
    if limit < 1:
        raise ValueError(f"a robustness limit must be >= 1 image, got {limit}")
    if sampling == "first":
        return range(limit)
    if sampling == "strided":
        return [i * n // limit for i in range(limit)]
    raise ValueError(f"sampling must be first or strided, got {sampling!r}")


def describe_subset(subset: Mapping | None) -> str:
    """"every image" or "subset of N of M, first" (per folder for released folders)."""
    if not subset:
        return "every image"
    per = " per folder" if subset.get("per_folder") else ""
    return f"subset of {subset['limit']}{per} of {subset['of']}, {subset['sampling']}"


# ----------------------------------------------------------------------------- public API


def evaluate_corruptions(backbone: nn.Module, classifier: nn.Module, images_uint8: torch.Tensor,
                         labels: torch.Tensor, *, size: int, mean, std,
                         corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                         batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                         limit: int | None = None, seed: int = 0, imagenet: bool = False,
                         class_indices: Sequence[int] | None = None, amp: str = "none",
                         sampling: str = "first") -> dict:
    """Corrupt a labelled image set on the fly and measure the classifier's error per
    (corruption, severity), plus the clean error.

    Args:
        backbone, classifier: ``classifier(backbone(x))`` gives logits (the linear probe of a
            run: :func:`bcssl.eval.linear.load_linear_classifier`); both run in eval mode under
            ``torch.no_grad`` (their modes are restored).
        images_uint8, labels: ``(N, C, H, W)`` uint8 and ``(N,)`` class indices (CPU tensors).
        size, mean, std: evaluation preprocessing (:func:`bcssl.eval.features.eval_preprocess`).
        limit, sampling: use only ``limit`` images, the ``first`` ones or ``strided`` over the set
            (recorded as ``subset``; None when every image was used).
        seed: corruption seed (see :func:`corrupt`).
        imagenet: the images are ImageNet (224-px) val images: then, with all 5 severities,
            ``ce``/``mce`` normalised by AlexNet are added (``normalised_by_alexnet: True``).
            For any other dataset the AlexNet normalisation is meaningless and is left out.
        class_indices: restrict predictions to these classifier classes (ImageNet-A/-R style).
        amp: "none" | "bf16" | "fp16" autocast for the backbone.

    Returns:
        ``{"benchmark", "corruptions", "severities", "errors": {c: [err per severity]},
        "clean_error", "mean_error" (unnormalised mean over the table), "mean_error_by_corruption",
        "n_images", "seed", "normalised_by_alexnet"}`` (+ ``"ce"``, ``"mce"``, ``"mce_complete"``
        when normalised). Errors are fractions; ``ce``/``mce`` are AlexNet-relative percentages.
    """
    corruptions, severities = _check_table_args(corruptions, severities)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if len(images_uint8) != len(labels):
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
    if len(labels) == 0 or (limit is not None and limit <= 0):
        raise ValueError("no images to evaluate (empty set or limit 0)")
    keep = subset_indices(len(labels), limit, sampling)
    subset = None if len(keep) == len(labels) else {"limit": len(keep), "of": len(labels), "sampling": sampling}
    n = len(keep)
    if isinstance(keep, range):  # the first n: views, as before
        images, labels = images_uint8[:n], labels[:n]
    else:
        idx = torch.as_tensor(keep, dtype=torch.long)
        images, labels = images_uint8[idx], labels[idx]

    predict = _Predictor(backbone, classifier, size=size, mean=mean, std=std, device=device,
                         class_indices=class_indices, amp=amp)
    errors: dict[str, list[float]] = {c: [] for c in corruptions}
    with predict:
        clean_error, _ = _error(predict, ((x, y) for _, x, y in _tensor_batches(images, labels, batch_size)))
        bar = tqdm(total=len(corruptions) * len(severities), desc="corruptions", disable=not progress)
        with bar:
            for c in corruptions:
                for s in severities:
                    bar.set_postfix_str(f"{c} s{s}")
                    batches = ((corrupt(x, c, s, seed, start_index=start), y)
                               for start, x, y in _tensor_batches(images, labels, batch_size))
                    errors[c].append(_error(predict, batches)[0])
                    bar.update(1)
    out = _summarise_table("imagenet_c" if imagenet else "corruptions", corruptions, severities, errors,
                           imagenet=imagenet, clean_error=clean_error, n_images=n, seed=int(seed))
    out["subset"] = subset
    out["images"] = describe_subset(subset)
    return out


def _class_map(classes: Sequence[str], folder) -> torch.Tensor:
    """Folder class names (wnids) -> classifier indices in the sorted 1000-wnid list."""
    bad = [c for c in classes if not is_wnid(c) or c not in WNID_TO_INDEX]
    if bad:
        raise ValueError(
            f"{folder}: class folders must be ImageNet wnids (e.g. n01440764) to map them to the "
            f"classifier's 1000 classes; not wnids of ImageNet-1k: {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else ""))
    return torch.tensor([WNID_TO_INDEX[c] for c in classes], dtype=torch.long)


def _open_folder(root, load_size):
    from bcssl.data import ImageFolderDataset  # late: keep the import light

    ds = ImageFolderDataset(root, load_size=load_size)
    return ds, _class_map(ds.classes, ds.root)


def _folder_error(predict: _Predictor, ds, to_index: torch.Tensor, *, batch_size, workers, limit,
                  sampling: str = "strided", progress: bool = False, desc: str = "") -> tuple[float, int, int]:
    from bcssl.data import BatchLoader
    from bcssl.eval.features import DatasetRows

    keep = subset_indices(len(ds), limit, sampling)
    if len(keep) < len(ds):
        ds = DatasetRows(ds, keep)
    loader = BatchLoader(ds, batch_size, shuffle=False, drop_last=False, workers=workers,
                         pin_memory=predict.device.type == "cuda")
    batches = tqdm(loader.epoch(0), total=len(loader), desc=desc, disable=not progress)
    err, n = _error(predict, ((x, to_index[y]) for x, y in batches))
    return err, n, loader.skipped


def evaluate_folder(backbone: nn.Module, classifier: nn.Module, folder: str | os.PathLike, kind: str, *,
                    size: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    load_size: int | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
                    progress: bool = True, limit: int | None = None, workers: int = 0,
                    corruptions: Sequence[str] | None = None, amp: str = "none", sampling: str = "strided") -> dict:
    """Evaluate a 1000-way ImageNet classifier on a released robustness set.

    ``kind``:
        - ``imagenet_a`` / ``imagenet_r``: an ImageFolder of (some of) the 200 classes; the
          prediction is the argmax over the logits of those 200 classes only (official protocol).
        - ``imagenet_sketch``: an ImageFolder of the 1000 classes.
        - ``imagenet_c``: ``<folder>/<corruption>/<severity>/<wnid>/*.JPEG`` (the released
          ImageNet-C tree); gives the error table and, with all 5 severities, the mCE.

    Class folder names must be wnids; they map to classifier indices by the sorted 1000-wnid
    list. ``load_size`` defaults to ``size * 256 / 224`` (Resize 256 + CenterCrop 224), and to
    ``size`` for ImageNet-C, whose images are already 224 centre crops. Every image is evaluated
    unless ``limit`` is set: then ``limit`` images of each folder, ``strided`` over it (every
    class) or the ``first`` ones (the first classes only: a biased smoke test), recorded in
    ``subset`` and ``images`` ("subset of N of M, strided").

    Returns for A/R/Sketch ``{"benchmark", "top1" (percent), "error" (fraction), "n_images",
    "n_classes", "skipped", "subset", "images"}``; for ImageNet-C the dict of
    :func:`evaluate_corruptions` (with ``clean_error`` None).
    """
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(FOLDER_KINDS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {folder} does not exist")
    out_features = getattr(classifier, "out_features", None)
    if out_features is not None and out_features != len(IMAGENET_WNIDS):
        raise ValueError(f"{kind} needs a 1000-way ImageNet classifier; this one has {out_features} classes")
    if load_size is None:
        load_size = size if kind == "imagenet_c" else round(size * 256 / 224)
    subset = {"imagenet_a": IMAGENET_A_INDICES, "imagenet_r": IMAGENET_R_INDICES}.get(kind)
    predict = _Predictor(backbone, classifier, size=size, mean=mean, std=std, device=device,
                         class_indices=subset, amp=amp)
    kw = dict(batch_size=batch_size, workers=workers, limit=limit, sampling=sampling)

    if kind != "imagenet_c":
        ds, to_index = _open_folder(folder, load_size)
        if subset is not None:
            allowed = {IMAGENET_WNIDS[i] for i in subset}
            foreign = [c for c in ds.classes if c not in allowed]
            if foreign:
                raise ValueError(f"{ds.root}: {len(foreign)} class folder(s) are not among the 200 "
                                 f"{_BENCHMARK_NAMES[kind]} classes (wrong kind?): {', '.join(foreign[:5])}")
        with predict:
            err, n, skipped = _folder_error(predict, ds, to_index, progress=progress,
                                            desc=_BENCHMARK_NAMES[kind], **kw)
        sub = {"limit": min(limit, len(ds)), "of": len(ds), "sampling": sampling} if limit and limit < len(ds) else None
        return {"benchmark": kind, "top1": 100.0 * (1.0 - err), "error": err, "n_images": n,
                "n_classes": len(subset) if subset is not None else len(IMAGENET_WNIDS), "skipped": skipped,
                "subset": sub, "images": describe_subset(sub)}

    # ImageNet-C tree
    present = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    wanted = tuple(corruptions) if corruptions is not None else CORRUPTIONS
    for c in wanted:
        _check_name(c)
    found = [c for c in wanted if c in present]
    ignored = [p for p in present if p not in CORRUPTIONS]
    if ignored:
        warnings.warn(f"{folder}: ignoring folders that are not the 15 ImageNet-C corruptions: "
                      f"{', '.join(ignored[:5])}", stacklevel=2)
    if not found:
        raise ValueError(f"{folder}: no corruption folders ({', '.join(wanted[:3])}, ...); expected "
                         "<root>/<corruption>/<severity>/<wnid>/*.JPEG")
    sev_sets = {c: [s for s in SEVERITIES if (folder / c / str(s)).is_dir()] for c in found}
    severities = sev_sets[found[0]]
    if not severities or any(v != severities for v in sev_sets.values()):
        raise ValueError(f"{folder}: every corruption needs the same severity folders 1..5; found "
                         + ", ".join(f"{c}: {v}" for c, v in sev_sets.items()))
    errors: dict[str, list[float]] = {c: [] for c in found}
    total = skipped = in_folders = 0
    with predict, tqdm(total=len(found) * len(severities), desc="ImageNet-C", disable=not progress) as bar:
        for c in found:
            for s in severities:
                bar.set_postfix_str(f"{c} s{s}")
                ds, to_index = _open_folder(folder / c / str(s), load_size)
                in_folders += len(ds)
                err, n, sk = _folder_error(predict, ds, to_index, **kw)
                errors[c].append(err)
                total += n
                skipped += sk
                bar.update(1)
    out = _summarise_table("imagenet_c", found, severities, errors, imagenet=True, clean_error=None,
                           n_images=total, seed=None)
    out["skipped"] = skipped
    out["subset"] = ({"limit": limit, "of": in_folders, "sampling": sampling, "per_folder": True}
                     if limit and total + skipped < in_folders else None)
    out["images"] = describe_subset(out["subset"])
    return out


def robustness_report_rows(result: Mapping) -> list[dict]:
    """Rows for a Table 5-style table, all with the same keys: ``benchmark``, ``name``,
    ``top1``, ``error``, ``ce``, ``sev_1``..``sev_5`` (percentages; None where not applicable).

    ``result`` is one dict from :func:`evaluate_corruptions` / :func:`evaluate_folder`, or a
    mapping of several (e.g. ``{"imagenet_c": ..., "imagenet_a": ...}``), whose rows follow
    each other. A corruption result gives one row per corruption, then ``clean`` (when
    measured) and ``mean`` (mean error; ``ce`` = mCE when normalised by AlexNet).
    """
    if "benchmark" not in result:
        rows: list[dict] = []
        for r in result.values():
            rows += robustness_report_rows(r)
        return rows

    def row(name, *, top1=None, error=None, ce=None, sevs=()):
        r = {"benchmark": _BENCHMARK_NAMES.get(result["benchmark"], result["benchmark"]), "name": name,
             "top1": top1, "error": error, "ce": ce}
        for s in SEVERITIES:
            r[f"sev_{s}"] = None
        for s, e in sevs:
            r[f"sev_{s}"] = 100.0 * e
        return r

    if "errors" not in result:  # A / R / Sketch
        return [row("all", top1=result["top1"], error=100.0 * result["error"])]
    ce = result.get("ce") if result.get("normalised_by_alexnet") else None
    rows = []
    for c in result["corruptions"]:
        m = result["mean_error_by_corruption"][c]
        rows.append(row(c, top1=100.0 * (1 - m), error=100.0 * m, ce=ce[c] if ce else None,
                        sevs=zip(result["severities"], result["errors"][c])))
    if result.get("clean_error") is not None:
        rows.append(row("clean", top1=100.0 * (1 - result["clean_error"]), error=100.0 * result["clean_error"]))
    rows.append(row("mean", top1=100.0 * (1 - result["mean_error"]), error=100.0 * result["mean_error"],
                    ce=result.get("mce") if ce else None))
    return rows


_FROM_CONFIG = object()


def evaluate_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, folder: str | None = None,
                 kind: str | None = None, corruptions: Sequence[str] | None = None,
                 severities: Sequence[int] | None = None, limit=_FROM_CONFIG, sampling: str | None = None,
                 device=None, progress: bool = True) -> dict:
    """Robustness of a run's eval backbone + linear probe (``bcssl eval robustness RUN``); each
    argument left out comes from the run's ``robustness.*`` config.

    Without ``folder``: corruptions made on the fly from the run's ``data.eval_split``
    (``robustness.corruption_limit`` images, 1000 by default; ImageNet-C style, for any in-memory
    dataset). With ``folder`` and ``kind``: a released ImageNet-C/-A/-R/-Sketch folder, every image
    unless ``limit`` (``robustness.folder_limit``) is set. Writes ``robustness.json`` (one entry per
    benchmark, merged with earlier ones; atomically) and returns this evaluation's result.
    """
    import json

    from bcssl.data import dataset_from_config, eval_image_size
    from bcssl.engine.run_dir import write_json
    from bcssl.engine.runtime import load_run_backbone, resolve_device
    from bcssl.eval.linear import load_linear_classifier

    cfg, backbone, _ = load_run_backbone(run_dir, overrides)
    rc = cfg.robustness
    folder = folder if folder is not None else rc.folder
    kind = kind if kind is not None else rc.kind
    if limit is _FROM_CONFIG:
        limit = rc.folder_limit if folder is not None else rc.corruption_limit
    sampling = sampling or rc.sampling
    if sampling == "auto":  # released folders are sorted by class; test sets come shuffled
        sampling = "strided" if folder is not None else "first"
    corruptions = list(corruptions or rc.corruptions or CORRUPTIONS)
    severities = [int(s) for s in (severities or rc.severities)]
    classifier = load_linear_classifier(run_dir)
    device = resolve_device(device or cfg.device)
    c = cfg.crops
    common = dict(size=eval_image_size(cfg), mean=tuple(c.mean), std=tuple(c.std), batch_size=cfg.eval.batch_size,
                  device=device, progress=progress, limit=limit, amp=cfg.train.amp, sampling=sampling)
    if folder is not None:
        if kind is None:
            raise ValueError(f"--folder needs --kind (robustness.kind), one of {', '.join(FOLDER_KINDS)}")
        result = evaluate_folder(backbone, classifier, folder, kind, workers=cfg.data.workers,
                                 corruptions=rc.corruptions, **common)
        name = kind
    else:
        d = cfg.data
        data = dataset_from_config(cfg, d.eval_split)
        if not hasattr(data, "images"):
            raise ValueError(f"on-the-fly corruptions need an in-memory dataset (data.name={d.name}); for "
                             "ImageNet pass the released ImageNet-C folder: --folder DIR --kind imagenet_c")
        result = evaluate_corruptions(backbone, classifier, data.images, data.labels, corruptions=corruptions,
                                      severities=severities, seed=cfg.seed, **common)
        name = f"{d.name}_c"
    out = Path(run_dir) / "robustness.json"
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[name] = result
    write_json(out, merged)
    return result


class Robustness(Evaluation):
    name = "robustness"
    section = "robustness"
    requires = ("linear",)  # classifies with the run's linear probe
    sweep_metrics = {"clean_error": ("clean error (%)", False),
                     "corruption_error": ("mean corruption error (%)", False)}

    def add_arguments(self, parser) -> None:
        parser.add_argument("--folder", default=None,
                            help="a released ImageNet-C/-A/-R/-Sketch folder (class folders named by wnid; "
                                 "robustness.folder)")
        parser.add_argument("--kind", default=None, choices=list(FOLDER_KINDS), help="what --folder is")
        parser.add_argument("--limit", type=int, default=None,
                            help="evaluate only N images (per folder); 0 = all. Default: "
                                 "robustness.corruption_limit (1000) on the fly, every image of a folder")
        parser.add_argument("--sampling", default=None, choices=["first", "strided"],
                            help="which N images with --limit (default: strided over a folder's classes, the "
                                 "first N of an in-memory test set)")
        parser.add_argument("--corruptions", default=None, help="comma-separated subset of the 15 (default: all)")
        parser.add_argument("--severities", default=None, help="comma-separated, default 1,2,3,4,5")

    def run(self, run_dir, overrides=(), *, progress: bool = True, folder=None, kind=None, limit=None,
            sampling=None, corruptions=None, severities=None, **options) -> dict:
        if isinstance(corruptions, str):
            corruptions = [x for x in corruptions.split(",") if x]
        if isinstance(severities, str):
            severities = [int(x) for x in severities.split(",") if x]
        lim = _FROM_CONFIG if limit is None else (limit or None)  # --limit 0: every image
        return evaluate_run(run_dir, overrides, folder=folder, kind=kind, corruptions=corruptions,
                            severities=severities, limit=lim, sampling=sampling, progress=progress)

    def summary(self, r: dict, run_dir) -> str:
        rows = robustness_report_rows(r)
        lines = [f"{row['name']:20s} error {row['error']:6.2f}%" + (f"  CE {row['ce']:.2f}" if row.get("ce") else "")
                 for row in rows]
        summary = (f"mean corruption error {100 * r['mean_error']:.2f}%" if "mean_error" in r
                   else f"top-1 {r['top1']:.2f}%")
        if r.get("mce") is not None:
            summary += f", mCE {r['mce']:.2f}"
        summary += f" ({r['n_images']} images: {r.get('images', 'every image')})"
        return "\n".join(lines + [summary, f"written to {Path(run_dir) / 'robustness.json'}"])

    def report_columns(self, run):
        from bcssl.eval.report import _FOLDER_BENCHMARKS, _f, _robustness_rows, _robustness_summary

        cols = []
        for b, m in _robustness_summary(_robustness_rows(run)).items():
            if b in _FOLDER_BENCHMARKS:
                cols.append((f"{b} top-1", _f(m.get("top1"))))
            else:
                cols += [(f"{b} mean err", _f(m.get("error"))), (f"{b} mCE", _f(m.get("ce")))]
        return cols

    def report_section(self, runs, out_dir, fig_dir):
        from bcssl.eval.report import _robustness_section

        return _robustness_section(runs)

    def sweep_values(self, r: dict) -> dict:
        import statistics

        from bcssl.sweep import CORRUPTION_GROUPS

        out = {}
        if r.get("mce") is not None:
            out["mce"] = r["mce"]
        by = r["mean_error_by_corruption"]
        if r.get("clean_error") is not None:
            out["clean_error"] = 100 * r["clean_error"]
        out.update(corruption_error=100 * r["mean_error"],
                   corruption_error_by_group={g: 100 * statistics.fmean(by[c] for c in cs if c in by)
                                              for g, cs in CORRUPTION_GROUPS.items() if any(c in by for c in cs)},
                   robustness_images=r["n_images"], robustness_subset=r.get("images"))
        return out


EVALUATION = Robustness()
