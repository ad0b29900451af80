"""Class activation maps (the paper's Table 6; docs/recipe.md section 5): Grad-CAM and Eigen-CAM of a backbone.

* Target layer: ``backbone.cam_target_layer`` (CNNs: the last block of the last stage; ViT/Swin:
  ``norm1`` of the last block), reshaped to 2-D by ``backbone.cam_reshape`` (``None`` for CNNs).
* Grad-CAM needs a scalar to differentiate:

  - with a linear probe (``<run>/linear.safetensors``) the model is ``nn.Sequential(backbone,
    classifier)`` and the target is the logit of the predicted class (``ClassifierOutputTarget``);
  - without one (a self-supervised backbone) the target is a feature similarity
    (:class:`FeatureSimilarityTarget`) between the image's pooled feature and a reference: by
    default the image's own clean pooled feature (detached), measured as the projection
    ``<f, r / |r|>`` -- the cosine similarity scaled by ``|f|``. The plain cosine similarity to
    one's own feature is at its maximum, so its gradient is zero (only float round-off is left,
    ~1e-9) and its Grad-CAM would be noise; the projection has the gradient ``r / |r|``: the
    regions that push the feature along its own direction. The cosine similarity is used when
    an explicit ``reference`` (another image's feature, a prototype) is given.
* Eigen-CAM needs no target (first principal component of the target layer's activations; its
  sign is the SVD's, as in pytorch-grad-cam).

Maps are ``float32 (N, H, W)`` in [0, 1] at the model's input resolution (each map min-max scaled
by pytorch-grad-cam). :func:`cam_grid` draws them like the paper's Table 6 (rows = models or
checkpoints, columns = images); :func:`cam_for_runs` does everything for a list of run dirs and
reports a "CAM area" (fraction of pixels above 0.5) per map and per row.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bcssl.engine.run_dir import write_json
from bcssl.eval.features import eval_preprocess
from bcssl.eval.registry import Evaluation

METHODS = ("gradcam", "eigencam")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
AREA_THRESHOLD = 0.5

# cam_grid geometry (inches at GRID_DPI): one square cell per image, a header row for the column
# labels (and title), a left margin for the row labels.
GRID_DPI = 100
CELL_IN = 1.6
HEADER_IN = 0.35
TITLE_IN = 0.35
LABEL_CHAR_IN = 0.075


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _image_files(paths_or_dir) -> list[Path]:
    if isinstance(paths_or_dir, (str, os.PathLike)):
        p = Path(paths_or_dir)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"{p} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            return files
        paths = [p]
    else:
        paths = [Path(x) for x in paths_or_dir]
        if not paths:
            raise ValueError("no images given")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"image {p} does not exist")
        if p.is_dir():
            raise ValueError(f"{p} is a directory; pass a directory alone or a list of image files")
    return paths


def load_images(paths_or_dir, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images as ``uint8 (N, 3, size, size)`` and their file names.

    ``paths_or_dir``: a directory (its image files, sorted by name, not recursive), one file, or
    a list of files. Each image is read with PIL as RGB, its shorter side resized to ``size``
    (bicubic) and centre-cropped to ``size x size``. A missing file is a ``FileNotFoundError``, an
    unreadable one a ``ValueError`` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    files = _image_files(paths_or_dir)
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {f}: {e}") from e
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out), [f.name for f in files]


def display_images(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """What the model sees, before normalisation, as ``uint8 (N, 3, size, size)`` (the same
    centre-crop / resize as :func:`bcssl.eval.features.eval_preprocess`)."""
    x = eval_preprocess(_check_images(images_uint8), size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] not in (1, 3):
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"images must be a uint8 tensor (N, 3 or 1, H, W), got {got}")
    if images.shape[0] == 0:
        raise ValueError("no images")
    return images


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


class FeatureSimilarityTarget:
    """Grad-CAM target for a backbone without a classifier: similarity of the pooled feature
    (pytorch-grad-cam calls the target on one image's model output, shape ``(D,)``; a batch
    ``(B, D)`` is accepted too) to a fixed ``reference`` ``(D,)``.

    ``kind='cosine'``: ``cos(f, r)``. ``kind='projection'``: ``<f, r / |r|>`` = ``|f| cos(f, r)``,
    the one to use when ``r`` is the image's own feature (the cosine's gradient vanishes there).
    """

    KINDS = ("cosine", "projection")

    def __init__(self, reference: torch.Tensor, kind: str = "cosine"):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        reference = torch.as_tensor(reference).detach().float()
        if reference.ndim != 1:
            raise ValueError(f"reference must be one feature vector (D,), got shape {tuple(reference.shape)}")
        self.reference = reference
        self.kind = kind

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        r = self.reference.to(model_output.device, model_output.dtype)
        if model_output.shape[-1] != r.shape[0]:
            raise ValueError(f"model output has {model_output.shape[-1]} features, the reference {r.shape[0]}")
        if self.kind == "cosine":
            return F.cosine_similarity(model_output, r.expand_as(model_output), dim=-1, eps=1e-8)
        return (model_output * F.normalize(r, dim=0, eps=1e-12)).sum(-1)

    def __repr__(self) -> str:
        return f"FeatureSimilarityTarget(kind={self.kind!r}, dim={self.reference.shape[0]})"


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM

    if method == "gradcam":
        return GradCAM
    if method == "eigencam":
        return EigenCAM
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def cam_maps(backbone: nn.Module, images_uint8: torch.Tensor, *, method: str, size: int, mean, std,
             classifier: Optional[nn.Module] = None, reference: Optional[torch.Tensor] = None,
             batch_size: int = 16, return_targets: bool = False):
    """Grad-CAM / Eigen-CAM maps, ``float32 (N, size, size)`` in [0, 1].

    ``images_uint8`` ``(N, 3 or 1, H, W)`` are preprocessed with
    :func:`bcssl.eval.features.eval_preprocess` (``size``, ``mean``, ``std``). ``method``:
    ``'gradcam'`` or ``'eigencam'``. Grad-CAM's target: the predicted class of ``classifier``
    (a linear probe on the pooled features) when given; else the similarity of each image's
    pooled feature to ``reference`` (``(D,)`` or ``(N, D)``, cosine) or, by default, to its own
    clean pooled feature (projection; see :class:`FeatureSimilarityTarget`).

    The backbone (and classifier, moved to the backbone's device) run in eval mode; every module's
    train/eval mode and every parameter's ``requires_grad`` are restored, and the hooks removed,
    afterwards.
    With ``return_targets=True`` also returns the predicted classes (a list of ints, classifier
    only; else ``None``).
    """
    cam_cls = _cam_class(method)
    images_uint8 = _check_images(images_uint8)
    if reference is not None and classifier is not None:
        raise ValueError("give either a classifier or a reference feature, not both")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target_layer = backbone.cam_target_layer
    reshape = backbone.cam_reshape
    model = backbone if classifier is None else nn.Sequential(backbone, classifier)
    device = next(backbone.parameters()).device
    if classifier is not None:
        classifier.to(device)
    n = images_uint8.shape[0]
    if reference is not None:
        reference = torch.as_tensor(reference).detach().float()
        if reference.ndim == 1:
            reference = reference.expand(n, -1)
        if reference.ndim != 2 or reference.shape[0] != n:
            raise ValueError(f"reference must be (D,) or (N={n}, D), got shape {tuple(reference.shape)}")

    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    out, predicted = [], []
    try:
        model.eval()
        # Gradients are only needed w.r.t. the activations: freeze the weights (no .grad left
        # behind) and let the input require grad so the graph exists even for frozen backbones.
        for p in grads:
            p.requires_grad_(False)
        cam = cam_cls(model=model, target_layers=[target_layer], reshape_transform=reshape)
        try:
            for s in range(0, n, batch_size):
                x = eval_preprocess(images_uint8[s:s + batch_size].to(device), size, mean, std)
                targets = None
                if method == "gradcam":
                    x.requires_grad_(True)
                    with torch.no_grad():
                        y = model(x)
                    if classifier is not None:
                        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

                        cls = y.argmax(-1).tolist()
                        predicted.extend(cls)
                        targets = [ClassifierOutputTarget(int(c)) for c in cls]
                    elif reference is not None:
                        targets = [FeatureSimilarityTarget(r, "cosine") for r in reference[s:s + batch_size]]
                    else:
                        targets = [FeatureSimilarityTarget(f, "projection") for f in y.detach()]
                elif classifier is not None:
                    with torch.no_grad():
                        predicted.extend(model(x).argmax(-1).tolist())
                with torch.enable_grad():
                    maps = cam(input_tensor=x, targets=targets)
                if s == 0:
                    acts = cam.activations_and_grads.activations
                    if acts and tuple(acts[0].shape[-2:]) == (1, 1):
                        warnings.warn(f"the CAM target layer's feature map is 1x1 at input size {size}: every "
                                      "map is constant (zeros); use larger images or a smaller stem_stride",
                                      stacklevel=2)
                out.append(torch.from_numpy(np.asarray(maps, dtype=np.float32)))
        finally:
            cam.activations_and_grads.release()
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, t in modes.items():
            m.training = t
    maps = torch.cat(out).clamp_(0, 1).nan_to_num_(0.0)
    if return_targets:
        return maps, (predicted if classifier is not None else None)
    return maps


def cam_area(maps: torch.Tensor, threshold: float = AREA_THRESHOLD) -> torch.Tensor:
    """Fraction of each map's pixels above ``threshold``: ``(N,)``."""
    return (maps > threshold).float().flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def overlay(image_uint8: torch.Tensor, cam: torch.Tensor, image_weight: float = 0.5) -> np.ndarray:
    """One image ``(3 or 1, H, W)`` uint8 with its map (any size, resized bilinearly to H x W)
    overlaid as a jet heat map: ``uint8 (H, W, 3)`` (pytorch-grad-cam's ``show_cam_on_image``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = image_uint8.float().div(255)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    h, w = img.shape[-2:]
    cam = torch.as_tensor(cam, dtype=torch.float32)
    if tuple(cam.shape) != (h, w):
        cam = F.interpolate(cam[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return show_cam_on_image(img.permute(1, 2, 0).numpy().astype(np.float32),
                             cam.clamp(0, 1).numpy(), use_rgb=True, image_weight=image_weight)


def grid_size_px(n_rows: int, n_cols: int, row_labels: Sequence[str], title: Optional[str] = None,
                 dpi: int = GRID_DPI) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`cam_grid` writes."""
    w, h, _, _ = _grid_inches(n_rows, n_cols, row_labels, title)
    return round(w * dpi), round(h * dpi)


def _grid_inches(n_rows, n_cols, row_labels, title):
    left = 0.2 + LABEL_CHAR_IN * max((len(line) for lab in row_labels for line in str(lab).splitlines()),
                                     default=0)
    top = HEADER_IN + (TITLE_IN if title else 0.0)
    return left + n_cols * CELL_IN + 0.1, top + n_rows * CELL_IN + 0.1, left, top


def cam_grid(rows: Sequence[tuple[str, torch.Tensor, torch.Tensor]], col_labels: Sequence[str],
             out_png: Union[str, os.PathLike], title: Optional[str] = None, dpi: int = GRID_DPI) -> Path:
    """A Table-6-style PNG: one row per ``(row_label, images_uint8 (N, 3|1, H, W), maps (N, h, w))``
    (models / checkpoints / methods), one column per image (``col_labels``, N of them); each cell
    is the image with its map overlaid (jet, half opacity). Returns the path written."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state (Agg for PNG)

    rows = list(rows)
    col_labels = [str(c) for c in col_labels]
    if not rows:
        raise ValueError("cam_grid needs at least one row")
    n_cols = len(col_labels)
    if n_cols == 0:
        raise ValueError("cam_grid needs at least one column label")
    for label, images, maps in rows:
        _check_images(images)
        if images.shape[0] != n_cols or len(maps) != n_cols:
            raise ValueError(f"row {label!r} has {images.shape[0]} images and {len(maps)} maps; "
                             f"expected {n_cols} (one per column label)")
    labels = [str(r[0]) for r in rows]
    width, height, left, top = _grid_inches(len(rows), n_cols, labels, title)
    fig = Figure(figsize=(width, height), dpi=dpi)
    pad = 0.04  # inches between cells
    for i, (label, images, maps) in enumerate(rows):
        for j in range(n_cols):
            x0 = left + j * CELL_IN + pad / 2
            y0 = height - top - (i + 1) * CELL_IN + pad / 2
            ax = fig.add_axes((x0 / width, y0 / height, (CELL_IN - pad) / width, (CELL_IN - pad) / height))
            ax.imshow(overlay(images[j], torch.as_tensor(maps[j])), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8, pad=3)
        fig.text((left - 0.1) / width, (height - top - (i + 0.5) * CELL_IN) / height, label,
                 ha="right", va="center", fontsize=8)
    if title:
        fig.text(0.5, 1 - (TITLE_IN * 0.5) / height, title, ha="center", va="center", fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def _kernel_label(backbone: nn.Module) -> Optional[str]:
    ks = backbone.kernel_sizes
    if ks is None:
        return None
    ks = [int(k) for k in ks]
    return str(ks[0]) if len(set(ks)) == 1 else "/".join(map(str, ks))


def cam_for_runs(run_dirs: Sequence[Union[str, os.PathLike]], images, *, methods: Sequence[str] = METHODS,
                 out_png: Union[str, os.PathLike], overrides: Sequence[str] = (),
                 title: Optional[str] = None, batch_size: int = 16) -> dict:
    """CAM maps of every run (and method) on the same images, drawn as one grid.

    ``images``: a directory, a file or a list of files (loaded with :func:`load_images` at each
    run's ``crops.global_size``), or a ``uint8 (N, 3|1, H, W)`` tensor (preprocessed per run by
    ``eval_preprocess``). Each run uses its saved config (+ dotlist ``overrides``): its eval
    backbone, ``crops.global_size`` / ``mean`` / ``std``, and its linear probe when
    ``linear.safetensors`` exists (Grad-CAM target = the predicted class; otherwise the feature
    similarity target). One row per (run, method), labelled ``"<run> k=<kernel> <method>"``
    (``"<run> <model> <method>"`` for models without a depthwise kernel).

    Writes ``out_png`` and a summary next to it (same name, ``.json``) and returns the summary:
    ``{"n_images", "area_threshold", "cam_area_mean": {label: mean area}, "png", "json",
    "images": [names], "rows": [{"label", "run_dir", "run",
    "model", "kernel_size", "method", "target", "checkpoint", "predicted", "cam_area",
    "cam_area_mean"}]}`` where ``cam_area`` is the fraction of each map above 0.5.
    """
    from bcssl.engine.runtime import load_run_backbone
    from bcssl.eval.linear import load_linear_classifier

    run_dirs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs)]
    if not run_dirs:
        raise ValueError("no run directories given")
    methods = list(methods)
    if not methods:
        raise ValueError("no CAM methods given")
    for m in methods:
        _cam_class(m)
    if isinstance(images, torch.Tensor):
        _check_images(images)
        names = [f"image {i}" for i in range(images.shape[0])]
    else:
        _image_files(images)  # fail early on a missing file, before loading any model
        names = None

    grid_rows, summary_rows = [], []
    from bcssl.data import eval_image_size

    for run_dir in run_dirs:
        cfg, backbone, ckpt_path = load_run_backbone(run_dir, overrides)
        size = eval_image_size(cfg)
        mean, std = list(cfg.crops.mean), list(cfg.crops.std)
        try:
            classifier = load_linear_classifier(run_dir)
        except FileNotFoundError:
            classifier = None
        if classifier is not None and classifier.in_features != backbone.num_features:
            raise ValueError(f"{run_dir}/linear.safetensors expects {classifier.in_features} features but the "
                             f"backbone gives {backbone.num_features}; rerun `bcssl eval linear {run_dir}`")
        if isinstance(images, torch.Tensor):
            run_images = images
        else:
            run_images, names = load_images(images, size)
        shown = display_images(run_images, size)
        kernel = _kernel_label(backbone)
        model_name = str(cfg.model.name)
        for method in methods:
            maps, predicted = cam_maps(backbone, run_images, method=method, size=size, mean=mean, std=std,
                                       classifier=classifier, batch_size=batch_size, return_targets=True)
            label = f"{run_dir.name} k={kernel} {method}" if kernel else f"{run_dir.name} {model_name} {method}"
            area = cam_area(maps)
            grid_rows.append((label, shown, maps))
            summary_rows.append({
                "label": label, "run_dir": str(run_dir), "run": run_dir.name, "model": model_name,
                "kernel_size": kernel, "method": method,
                "target": ("none" if method == "eigencam" else
                           "predicted class" if classifier is not None else "feature similarity"),
                "checkpoint": str(ckpt_path), "predicted": predicted,
                "cam_area": [round(float(a), 4) for a in area],
                "cam_area_mean": round(float(area.mean()), 4),
            })
    png = cam_grid(grid_rows, names, out_png, title=title)
    summary = {"n_images": len(names), "area_threshold": AREA_THRESHOLD,
               "cam_area_mean": {r["label"]: r["cam_area_mean"] for r in summary_rows},
               "png": str(png), "json": str(png.with_suffix(".json")), "images": list(names),
               "rows": summary_rows}
    write_json(summary["json"], summary)
    return summary


def default_images(run_dir: Union[str, os.PathLike], n: int = 8) -> torch.Tensor:
    """uint8 images: the first eval-split image of each of the first ``n`` classes of a run's data
    (the default CAM images of ``bcssl viz cam`` and the sweep's CAM grid)."""
    from bcssl.data import dataset_from_config
    from bcssl.engine.run_dir import load_run_config

    cfg = load_run_config(run_dir)
    ds = dataset_from_config(cfg, cfg.data.eval_split)
    picked: dict[int, torch.Tensor] = {}
    for i in range(len(ds)):
        item = ds[i]
        if item is not None and int(item[1]) not in picked:
            picked[int(item[1])] = item[0]
        if len(picked) >= min(n, ds.num_classes):
            break
    return torch.stack([picked[c] for c in sorted(picked)])


class Cam(Evaluation):
    name = "cam"
    section = "cam"

    def run(self, run_dir, overrides=(), *, progress: bool = True, **options) -> dict:
        """``cam.png`` + ``cam.json`` in the run: one row per ``cam.methods``, columns = ``cam.images``
        (default: the first eval image of each of the first ``cam.n_images`` classes)."""
        from bcssl.engine.run_dir import load_run_config
        from bcssl.config import load_config

        load_run_config(run_dir)  # a clear error when run_dir is not a run
        cc = load_config(str(Path(run_dir) / "config.yaml"), list(overrides)).cam
        images = cc.images if cc.images else default_images(run_dir, cc.n_images)
        return cam_for_runs([run_dir], images, methods=list(cc.methods), out_png=Path(run_dir) / "cam.png",
                            overrides=overrides)

    def summary(self, s: dict, run_dir) -> str:
        rows = "\n".join(f"{k:40s} mean CAM area {v:.3f}" for k, v in s["cam_area_mean"].items())
        return f"{rows}\nCAM grid: {s['png']}"

    def report_section(self, runs, out_dir, fig_dir):
        from bcssl.eval.report import _cam_section

        return _cam_section(runs, out_dir, fig_dir)


EVALUATION = Cam()
