"""``bcssl viz crops``: the pre-training multi-crops of a few images, as a grid PNG and as boxes.

Users check their augmentation settings with it (``crops.*``); tests check the crop sampler with
its boxes. Image files go through the pre-training path itself: each image's boxes are sampled
over the original image in :meth:`ImageFolderDataset.crop_item`, as if the images were positions
0..n-1 of global step ``step`` (their crop seeds), and the photometric part is
:meth:`MultiCrop.from_crops` with that step's seed. In-memory sets (Fashion-MNIST, CIFAR, STL)
go through the batched device path (:meth:`MultiCrop.__call__`), whose boxes are continuous.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bcssl.data.crops import CropItem, crop_seed, open_rgb
from bcssl.data.datasets import ImageFolderDataset, pretraining_dataset
from bcssl.data.loader import CropBatch
from bcssl.data.multicrop import multicrop_from_config

__all__ = ["crop_layout", "crops_grid", "visualize_crops"]

#: box / border colours of the crops: the two globals, then the locals
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]


def _thumb(img, side: int):
    from PIL import Image

    scale = side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BICUBIC)


def crop_layout(cfg, images: str | os.PathLike | None = None, n: int = 4, step: int = 0, thumb: int = 160) -> dict:
    """The crops of the first ``n`` readable images of ``images`` (a folder: flat or class folders)
    or of the config's pre-training data.

    Returns ``{"images": [{"path", "width", "height", "crops": [{"kind": "global"|"local",
    "box": [x0, y0, x1, y1], "flip": bool}]}], "crops": [[float (3, S, S) per crop] per image]}``:
    boxes in the original image's pixels (x1, y1 exclusive; whole pixels for files, sub-pixel for
    in-memory sets), the crops de-normalised to [0, 1] as the network sees them; also
    ``"thumbs"``: the originals as PIL images of longer side ``thumb``.
    """
    from PIL import Image

    from bcssl.engine.runtime import step_seed

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    multicrop = multicrop_from_config(cfg.crops)
    mc = multicrop.cfg
    kinds = ["global"] * 2 + ["local"] * mc.n_local
    ds = ImageFolderDataset(images, split=cfg.data.split) if images is not None else pretraining_dataset(cfg)
    seed = step_seed(cfg.seed, step)
    entries, thumbs = [], []
    if hasattr(ds, "crop_item"):
        items, paths = [], []
        for i in range(len(ds)):
            item = ds.crop_item(i, crop_seed(cfg.seed, step, len(items)), mc)
            if isinstance(item, CropItem):
                items.append(item)
                paths.append(ds.path(i))
                thumbs.append(_thumb(open_rgb(ds.path(i), min_side=thumb)[0], thumb))
                if len(items) == n:
                    break
        if not items:
            raise ValueError(f"none of the {len(ds)} images in {ds.root} could be read")
        batch = CropBatch.stack(items, list(range(len(items))), mc)
        params = multicrop.select_params(multicrop.sample_params(len(items), seed), batch.positions)
        crops = multicrop.apply_crops(batch.groups, params)
        for k, (item, path) in enumerate(zip(items, paths)):
            boxes = [[j, i, j + w, i + h] for i, j, h, w in item.boxes.tolist()]
            entries.append({"path": path, "width": item.size[0], "height": item.size[1],
                            "crops": [{"kind": kind, "box": box, "flip": bool(params["flip"][k, c])}
                                      for c, (kind, box) in enumerate(zip(kinds, boxes))]})
    else:  # an in-memory set: crops made on the device from continuous boxes
        n = min(n, len(ds))
        images_u8 = torch.stack([ds[i][0] for i in range(n)])
        h, w = images_u8.shape[-2:]
        params = multicrop.sample_params(n, seed, image_size=(h, w))
        thumbs = [_thumb(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB"), thumb)
                  for img in images_u8]
        crops = multicrop.apply(images_u8, params)
        name = f"{cfg.data.name}:{cfg.data.split}"
        for k in range(n):
            boxes = [[left * w, top * h, (left + bw) * w, (top + bh) * h]
                     for top, left, bh, bw in params["box"][k].tolist()]
            entries.append({"path": f"{name}#{k}", "width": int(w), "height": int(h),
                            "crops": [{"kind": kind, "box": [round(v, 3) for v in box],
                                       "flip": bool(params["flip"][k, c])}
                                      for c, (kind, box) in enumerate(zip(kinds, boxes))]})
    mean, std = torch.tensor(mc.mean).view(3, 1, 1), torch.tensor(mc.std).view(3, 1, 1)
    seen = [[(crop[k] * std + mean).clamp(0, 1) for crop in crops] for k in range(len(entries))]
    return {"images": entries, "crops": seen, "thumbs": thumbs}


def crops_grid(layout: dict, out_png: str | os.PathLike, cell: int = 96) -> Path:
    """One row per image: the original with every crop's box drawn, then the crops as the network
    sees them (each framed in its box's colour; globals first)."""
    from PIL import Image, ImageDraw

    rows = []
    for entry, crops, original in zip(layout["images"], layout["crops"], layout["thumbs"]):
        thumb = max(original.size)
        scale = original.width / entry["width"]
        canvas = Image.new("RGB", (thumb + 8 + len(crops) * (cell + 4), max(thumb, cell) + 8), (255, 255, 255))
        canvas.paste(original, (4, 4))
        draw = ImageDraw.Draw(canvas)
        for c, crop in enumerate(entry["crops"]):
            x0, y0, x1, y1 = (v * scale + 4 for v in crop["box"])
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=_COLOURS[c % len(_COLOURS)])
        for c, img in enumerate(crops):
            arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(arr).resize((cell - 4, cell - 4), Image.Resampling.NEAREST)
            x = thumb + 8 + c * (cell + 4)
            draw.rectangle([x, 4, x + cell - 1, 4 + cell - 1], fill=_COLOURS[c % len(_COLOURS)])
            canvas.paste(tile, (x + 2, 6))
        rows.append(canvas)
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def visualize_crops(cfg, images=None, n: int = 4, step: int = 0, out_png: str | os.PathLike = "crops.png") -> dict:
    """:func:`crop_layout` + :func:`crops_grid`: returns ``{"png", "images"}`` (the boxes)."""
    layout = crop_layout(cfg, images, n, step)
    png = crops_grid(layout, out_png)
    return {"png": str(png), "images": layout["images"]}
