"""Detection transfer (the paper's Table 4; docs/recipe.md section 5): Mask R-CNN + FPN fine-tuned
from a run's backbone on COCO-format data, scored with COCO box and mask AP.

The detector is torchvision's Mask R-CNN; the backbone is the run's eval backbone (``eval.encoder``)
with its BatchNorms folded into the depthwise convs. BC-SSL's BN is a fixed affine map at inference,
so the folded network is exactly a ConvNeXt with k x k kernels, and fine-tuning at 2 images per GPU
could not give BN useful batch statistics anyway. As ConvNeXt's detection backbone does, each of
the four stage outputs gets its own (new) LayerNorm before the FPN.

Recipe (``detection.*``, defaults): the "3x" schedule of the Swin / ConvNeXt mmdetection configs
that the paper's Table 4 follows:
- 36 epochs; lr x0.1 after epochs 27 and 33; linear warm-up over the first 500 iterations from
  0.001 x lr;
- AdamW, lr 1e-4, weight decay 0.05 (none on biases and norms), 16 images per step in total;
- multi-scale training: shorter side drawn from 480..800 (step 32), longer side <= 1333;
  horizontal flip with p = 0.5; test at 800 / 1333;
- stochastic depth 0.2 in the backbone (rising linearly over the blocks).

Data: ``detection.root`` in the COCO layout (``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``), or any of the four paths set on its own. Crowd
annotations and degenerate boxes are left out of training, images with nothing left are skipped
(as mmdetection does). Labels are the COCO category ids (the classifier has max id + 1 outputs, as
torchvision's COCO models), so predictions need no mapping back.

Everything is deterministic per (seed, step): the image order, the flips and the samplers of the
RPN and RoI heads. ``<run>/detection/checkpoint.pt`` is written atomically every epoch and every
``detection.checkpoint_every_steps``; rerunning the command resumes. Under ``torchrun`` (or
``--nproc N``) each process takes its slice of every step's images and DDP averages the gradients;
rank 0 evaluates. Results go to ``<run>/detection.json``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bcssl.eval.registry import Evaluation

log = logging.getLogger("bcssl.detection")


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


class StageFeatures(nn.Module):
    """A backbone's four stage maps (the contract's ``forward_intermediates``, strides 4, 8, 16, 32
    with stem stride 4) as ``{"0": ..., "3": ...}``, each through its own LayerNorm (ConvNeXt's
    detection backbone)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if len(backbone.feature_info) != 4:
            raise ValueError(f"detection needs a backbone with 4 stage maps (an FPN over strides 4..32), got "
                             f"{len(backbone.feature_info)} from {type(backbone).__name__}")
        from bcssl.models.bcssl_convnext import LayerNorm2d

        self.backbone = backbone
        self.channels = [s.channels for s in backbone.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        _, maps = self.backbone.forward_intermediates(x)
        return OrderedDict((str(i), norm(m)) for i, (m, norm) in enumerate(zip(maps, self.norms)))


class BackboneFPN(nn.Module):
    """Stage features -> FPN with 256 channels and an extra max-pooled level (5 maps), the
    ``backbone`` torchvision's Mask R-CNN expects (``out_channels``)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = StageFeatures(backbone)
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (ConvNeXt's rule)."""
    backbone.set_drop_path(rate)


def build_mask_rcnn(backbone: nn.Module, num_classes: int, *, min_size: Sequence[int] | int = 800,
                    max_size: int = 1333, test_size: int = 800, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), rpn_post_nms_top_n_train: int = 1000,
                    box_batch_size_per_image: int = 512, detections_per_img: int = 100) -> nn.Module:
    """torchvision's Mask R-CNN on ``backbone`` + FPN. ``min_size``: the training shorter sides
    (one is drawn per batch); evaluation resizes to ``test_size``. Inputs: float images in [0, 1].
    ``rpn_post_nms_top_n_train``: 1000 proposals per image, as mmdetection's Mask R-CNN
    (torchvision's default is 2000)."""
    from torchvision.models.detection import MaskRCNN

    model = MaskRCNN(BackboneFPN(backbone), num_classes=num_classes, min_size=tuple(min_size) if
                     isinstance(min_size, (list, tuple)) else (int(min_size),), max_size=max_size,
                     image_mean=list(mean), image_std=list(std), rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                     box_batch_size_per_image=box_batch_size_per_image, box_detections_per_img=detections_per_img)
    model.train_min_size, model.test_min_size = model.transform.min_size, (int(test_size),)
    return model


def set_mode(model: nn.Module, train: bool) -> None:
    """train()/eval() plus the matching resize: the multi-scale sizes in training, one in test."""
    model.train(train)
    model.transform.min_size = model.train_min_size if train else model.test_min_size


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _need_pycocotools():
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise ImportError("detection needs pycocotools: pip install pycocotools") from None


class CocoDetectionSet(torch.utils.data.Dataset):
    """COCO images + instance annotations -> ``(float image (3, H, W) in [0, 1], target)`` with
    ``boxes`` (xyxy), ``labels`` (category ids), ``masks`` (N, H, W) and ``image_id``.

    ``train``: crowd annotations and boxes under 1 px are dropped, images left without any are
    skipped, and each image is flipped horizontally with p = 0.5 decided by (seed, epoch, index)
    (``set_epoch``), so the data of a step does not depend on workers or on resuming."""

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, *, train: bool, seed: int = 0,
                 flip_p: float = 0.5):
        _need_pycocotools()
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        images, annotations = Path(images), Path(annotations)
        if not images.is_dir():
            raise FileNotFoundError(f"COCO image folder {images} does not exist (set detection.root to a folder "
                                    "with train2017/, val2017/ and annotations/, or detection.*_images)")
        if not annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file {annotations} does not exist "
                                    "(detection.root/annotations/instances_*.json, or detection.*_annotations)")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            try:
                base = CocoDetection(str(images), str(annotations))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{annotations} is not a COCO instances file: {e!r}") from None
        self.coco = base.coco
        self.data = wrap_dataset_for_transforms_v2(base, target_keys=("image_id", "boxes", "labels", "masks",
                                                                      "iscrowd"))
        self.train, self.seed, self.flip_p, self.epoch = train, int(seed), float(flip_p), 0
        ids = list(base.ids)
        if train:
            keep = [i for i, img_id in enumerate(ids) if any(
                not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
                for a in self.coco.imgToAnns.get(img_id, []))]
        else:
            keep = list(range(len(ids)))
        self.indices = keep
        self.image_ids = [ids[i] for i in keep]
        cats = self.coco.getCatIds()
        self.num_classes = (max(cats) if cats else 0) + 1  # + background (id 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as F

        image, target = self.data[self.indices[i]]
        image = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        h, w = image.shape[-2:]
        boxes = target.get("boxes")
        n = 0 if boxes is None else len(boxes)
        out = {"image_id": int(target["image_id"]),
               "boxes": boxes.as_subclass(torch.Tensor).float() if n else torch.zeros(0, 4),
               "labels": target["labels"].long() if n else torch.zeros(0, dtype=torch.long),
               "masks": target["masks"].as_subclass(torch.Tensor).to(torch.uint8) if n
               else torch.zeros(0, h, w, dtype=torch.uint8)}
        if self.train:
            crowd = torch.as_tensor(target["iscrowd"], dtype=torch.bool) if n else torch.zeros(0, dtype=torch.bool)
            wh = out["boxes"][:, 2:] - out["boxes"][:, :2]
            keep = ~crowd & (wh > 1).all(1)
            out = {k: (v[keep] if k != "image_id" else v) for k, v in out.items()}
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7_919 + i) % (2 ** 63 - 1))
            if torch.rand((), generator=g).item() < self.flip_p:
                image = image.flip(-1)
                b = out["boxes"].clone()
                out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
                out["masks"] = out["masks"].flip(-1)
        return image, out


def _collate(items):
    return [im for im, _ in items], [t for _, t in items]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(outputs: Sequence[dict], image_ids: Sequence[int], mask_threshold: float = 0.5) -> tuple[list, list]:
    """Mask R-CNN outputs (one dict per image, in original image coordinates) -> COCO result
    lists for ``bbox`` (xywh) and ``segm`` (RLE of the mask probabilities > ``mask_threshold``)."""
    from pycocotools import mask as mask_util

    boxes_out, segm_out = [], []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().float()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].tolist(), out["labels"].tolist()
        masks = out.get("masks")
        for j, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            boxes_out.append({"image_id": int(img_id), "category_id": int(label), "bbox": box, "score": float(score)})
            if masks is not None:
                m = (masks[j, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
                rle = mask_util.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                segm_out.append({"image_id": int(img_id), "category_id": int(label), "segmentation": rle,
                                 "score": float(score)})
    return boxes_out, segm_out


def coco_ap(coco_gt, results: list, iou_type: str, image_ids: Sequence[int]) -> dict:
    """COCOeval's AP, AP50, AP75, APs/m/l (in %) of ``results`` on ``image_ids``; 0 without results,
    None for a size range without ground truth."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in AP_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table; we return it
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 means "no ground truth in this size range": None (null in the JSON), not a score
    return {name: (100.0 * float(v) if v >= 0 else None) for name, v in zip(AP_NAMES, ev.stats[:6])}


@torch.no_grad()
def evaluate_detector(model: nn.Module, data: CocoDetectionSet, *, device, batch_size: int = 2, workers: int = 0,
                      progress: bool = True) -> dict:
    """Box and mask AP of ``model`` on ``data`` (its ``coco`` ground truth)."""
    from tqdm import tqdm

    set_mode(model, train=False)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate)
    outputs, ids = [], []
    for images, targets in tqdm(loader, desc="detection eval", disable=not progress, dynamic_ncols=True):
        for out in model([im.to(device) for im in images]):
            outputs.append({k: v.cpu() for k, v in out.items()})
        ids += [t["image_id"] for t in targets]
    boxes, segms = coco_results(outputs, ids)
    box, mask = coco_ap(data.coco, boxes, "bbox", ids), coco_ap(data.coco, segms, "segm", ids)
    return {**{f"box_{k}": v for k, v in box.items()}, **{f"mask_{k}": v for k, v in mask.items()}}


# ------------------------------------------------------------------------------------------------
# fine-tuning
# ------------------------------------------------------------------------------------------------


def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """Linear warm-up over ``warmup_iters`` from ``warmup_ratio`` x lr, then x0.1 after each epoch
    in ``lr_steps`` (mmdetection's step policy)."""
    lr = cfg.lr * 0.1 ** sum(step >= e * steps_per_epoch for e in cfg.lr_steps)
    if step < cfg.warmup_iters:
        lr *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return lr


def _paths(d) -> dict:
    root = Path(d.root) if d.root else None

    def pick(value, default):
        if value:
            return Path(value)
        if root is None:
            raise FileNotFoundError("set detection.root (COCO layout: train2017/, val2017/, annotations/) or all "
                                    "four of detection.train_images/train_annotations/val_images/val_annotations")
        return root / default
    return {"train_images": pick(d.train_images, "train2017"),
            "train_annotations": pick(d.train_annotations, "annotations/instances_train2017.json"),
            "val_images": pick(d.val_images, "val2017"),
            "val_annotations": pick(d.val_annotations, "annotations/instances_val2017.json")}


def detection_of_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, device=None,
                     progress: bool = True) -> dict:
    """Fine-tune Mask R-CNN from a run's backbone (``detection.*``) and evaluate it on the val
    split; resumes from ``<run>/detection/checkpoint.pt``. Writes and returns ``detection.json``."""
    from tqdm import tqdm

    from bcssl.data.loader import epoch_order
    from bcssl.engine import checkpoint as ckpt
    from bcssl.engine import distributed as ddp
    from bcssl.engine.amp import autocast as amp_autocast
    from bcssl.engine.run_dir import write_json
    from bcssl.engine.runtime import TrainingError, load_run, param_groups, resolve_device, step_seed

    t_start = time.perf_counter()
    run = Path(run_dir)
    loaded = load_run(run, overrides)
    cfg = loaded.cfg
    d = cfg.detection
    paths = _paths(d)
    dist, device = ddp.init_distributed(str(resolve_device(str(device) if device is not None else cfg.device)))
    if d.batch_size % dist.world_size:
        raise ValueError(f"detection.batch_size {d.batch_size} (images per step, all processes) must be a multiple "
                         f"of the {dist.world_size} processes")
    per_rank = d.batch_size // dist.world_size

    train_set = CocoDetectionSet(paths["train_images"], paths["train_annotations"], train=True, seed=cfg.seed)
    val_set = CocoDetectionSet(paths["val_images"], paths["val_annotations"], train=False)
    if len(train_set) < d.batch_size:
        raise ValueError(f"{paths['train_annotations']}: {len(train_set)} training images with annotations, fewer "
                         f"than one step of detection.batch_size={d.batch_size}")
    num_classes = max(train_set.num_classes, val_set.num_classes)

    backbone = loaded.backbone.fold_bn().train()
    set_drop_path(backbone, d.drop_path_rate)
    torch.manual_seed(cfg.seed)  # the new layers' initialisation
    model = build_mask_rcnn(backbone, num_classes, min_size=list(range(d.min_size[0], d.min_size[1] + 1, 32)),
                            max_size=d.max_size, test_size=d.test_size, mean=tuple(cfg.crops.mean),
                            std=tuple(cfg.crops.std), rpn_post_nms_top_n_train=d.rpn_post_nms_top_n_train,
                            box_batch_size_per_image=d.box_batch_size_per_image,
                            detections_per_img=d.detections_per_img).to(device)
    optimizer = torch.optim.AdamW(param_groups(model), lr=d.lr, weight_decay=d.weight_decay)
    if d.amp == "fp16" and device.type != "cuda":
        raise TrainingError("detection.amp=fp16 needs a CUDA device; use bf16 or none on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=d.amp == "fp16")
    autocast = amp_autocast(d.amp, device)
    steps_per_epoch = len(train_set) // d.batch_size
    total = steps_per_epoch * d.epochs

    out_dir = run / "detection"
    ck_path = out_dir / "checkpoint.pt"
    start = 0
    resume_path = ckpt.latest(out_dir)  # checkpoint.pt, or its previous copy when that one is unreadable
    if resume_path is not None:
        state = ckpt.load(resume_path)
        if state.get("num_classes") != num_classes or state.get("checkpoint_sha256") != loaded.checkpoint_sha256:
            raise ValueError(f"{ck_path} was fine-tuned from another checkpoint or class set; remove {out_dir} "
                             "to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler", {}))
        start = int(state["step"])
        log.info("detection: resuming at step %d/%d", start, total)
    # find_unused_parameters: the backbone's pooling head (e.g. BC-SSL's head.norm) is not used by detection
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                     find_unused_parameters=True)
           if dist.enabled else model)

    def save(step: int) -> None:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "step": step,
                       "num_classes": num_classes, "checkpoint_sha256": loaded.checkpoint_sha256}, ck_path)

    epoch_losses = []  # mean loss of each epoch trained in this call, over all ranks
    step = start
    for epoch in range(start // steps_per_epoch, d.epochs):
        first = step - epoch * steps_per_epoch
        order = epoch_order(len(train_set), cfg.seed, epoch)
        batches = [order[s * d.batch_size:(s + 1) * d.batch_size][dist.rank * per_rank:(dist.rank + 1) * per_rank]
                   .tolist() for s in range(first, steps_per_epoch)]
        train_set.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=d.workers,
                                             collate_fn=_collate, pin_memory=device.type == "cuda")
        set_mode(model, train=True)
        bar = tqdm(loader, total=steps_per_epoch, initial=first, desc=f"detection epoch {epoch + 1}/{d.epochs}",
                   disable=not (progress and dist.is_main), dynamic_ncols=True)
        losses = []
        for images, targets in bar:
            lr = lr_at(step, steps_per_epoch, d)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(cfg.seed, step))  # the size drawn, the RPN / RoI samplers, drop path
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with autocast:
                loss_dict = net(images, targets)
            loss = sum(loss_dict.values())
            if ddp.any_process([not math.isfinite(loss.item())], device)[0]:
                parts = ", ".join(f"{k} {v.item():.3g}" for k, v in loss_dict.items())
                raise TrainingError(f"detection: non-finite loss at step {step} ({parts}); lower detection.lr or "
                                    "use detection.amp=none (the last checkpoint is kept)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", refresh=False)
            if d.checkpoint_every_steps and step % d.checkpoint_every_steps == 0 and step % steps_per_epoch:
                save(step)
        bar.close()
        save(step)
        ddp.barrier()
        if losses:  # every rank trained the same number of steps: the mean of the ranks' means
            epoch_losses.append(ddp.all_reduce_mean(torch.tensor(sum(losses) / len(losses), device=device)).item())
            log.info("detection epoch %d: mean loss %.4f", epoch + 1, epoch_losses[-1])

    result = {}
    if dist.is_main:
        ap = evaluate_detector(model, val_set, device=device, batch_size=max(1, per_rank), workers=d.workers,
                               progress=progress)
        result = {"run_dir": str(run), **ap, "epochs": d.epochs, "steps": total, "train_images": len(train_set),
                  "val_images": len(val_set), "num_classes": num_classes, "epoch_losses": epoch_losses,
                  "encoder": loaded.encoder,
                  "checkpoint_sha256": loaded.checkpoint_sha256, "wall_s": time.perf_counter() - t_start}
        write_json(run / "detection.json", result)
    ddp.barrier()
    ddp.shutdown_distributed()
    return result


class Detection(Evaluation):
    name = "detection"
    section = "detection"
    distributed = True

    def run(self, run_dir, overrides=(), *, progress: bool = True, **options) -> dict:
        return detection_of_run(run_dir, overrides, progress=progress)

    def summary(self, r: dict, run_dir) -> str:
        return (f"Mask R-CNN ({r['epochs']} epochs, {r['train_images']} images): box AP {r['box_AP']:.1f}, "
                f"mask AP {r['mask_AP']:.1f} on {r['val_images']} images; written to {Path(run_dir) / 'detection.json'}")

    def report_columns(self, run):
        from bcssl.eval.report import _f

        det = run.results.get("detection") or {}
        return [("box AP", _f(det.get("box_AP"))), ("mask AP", _f(det.get("mask_AP")))]


EVALUATION = Detection()

__all__ = ["StageFeatures", "BackboneFPN", "build_mask_rcnn", "set_mode", "set_drop_path", "CocoDetectionSet",
           "coco_results", "coco_ap", "evaluate_detector", "lr_at", "detection_of_run", "AP_NAMES"]
