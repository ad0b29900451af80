"""The interface every self-supervised method implements, and the helpers they share."""
from __future__ import annotations

from typing import Iterable

import torch
from omegaconf import OmegaConf
from torch import nn

from bcssl.engine.runtime import param_groups
from bcssl.engine.schedules import cosine_schedule
from bcssl.models import create_backbone


def backbone_kwargs(model_cfg, **overrides) -> dict:
    """``create_backbone(model_cfg.name, **kwargs)`` kwargs of a ``model.*`` config; ``overrides``
    (e.g. ``drop_path_rate=0``) win. Keys left at None are not passed, so each model keeps its own
    default; lists become tuples."""
    kw = {}
    for key in ("kernel_size", "dw_norm", "stem_stride", "drop_path_rate", "depths", "dims", "zero_init_last"):
        value = model_cfg.get(key)
        if value is not None:
            kw[key] = tuple(value) if OmegaConf.is_list(value) else value
    kw.update(overrides)
    return kw


def backbone_from_config(model_cfg, **overrides) -> nn.Module:
    """Build ``model.*`` from a config (:func:`backbone_kwargs`)."""
    kw = backbone_kwargs(model_cfg, **overrides)
    try:
        return create_backbone(model_cfg.name, **kw)
    except TypeError as e:
        if "zero_init_last" in kw and "zero_init_last" in str(e):
            raise ValueError(f"model.zero_init_last applies to resnet50 only, not model.name={model_cfg.name}; "
                             "leave it null") from None
        raise


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops: crops of equal resolution go through the backbone in
    one batch (as in DINO's MultiCropWrapper); the head then runs once on all features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], return_features: bool = False):
        """Head outputs of all crops, concatenated in crop order; with ``return_features`` also the
        backbone features they were computed from."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(feats)
        out = self.head(features)
        return (out, features) if return_features else out


@torch.no_grad()
def ema_update(target: Iterable[nn.Parameter], source: Iterable[nn.Parameter], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameters only (buffers such as
    BN running statistics are not averaged: each network keeps its own, as in DINO/BYOL)."""
    t, s = list(target), list(source)
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def decay_all_param_groups(module: nn.Module) -> list[dict]:
    """Weight decay on every trained parameter (biases and norms too): one group, and an empty
    second group so the trainer's ``[decayed, not decayed]`` layout holds."""
    return [{"params": [p for p in module.parameters() if p.requires_grad]}, {"params": [], "weight_decay": 0.0}]


def frozen_copy(target: nn.Module, source: nn.Module) -> nn.Module:
    """Give ``target`` the weights of ``source`` and no gradients: how every EMA network
    (DINO's teacher, BYOL's target, MoCo's momentum encoder) starts."""
    target.load_state_dict(source.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class SSLMethod(nn.Module):
    """Base class: a method owns its networks, its loss and its own schedules (EMA momentum,
    temperatures); the trainer owns the optimiser, lr/wd schedules, AMP and checkpoints.

    Subclasses set ``self.student`` (the module whose parameters are optimised) and implement
    :meth:`loss` and :meth:`backbones`.
    """

    student: nn.Module
    base_momentum: float  # EMA momentum at step 0 (set by each method from its config section)
    # The network evaluated when ``eval.encoder`` is ``auto``: the one the method's paper and
    # official evaluation scripts use (DINO: the teacher; BYOL, MoCo v3, CARE: the online encoder).
    default_eval_encoder: str = "teacher"
    # The run length, set by setup(); until then a one-step run (a method used outside the trainer)
    steps_per_epoch: int = 1
    epochs: int = 1
    total_steps: int = 1

    def setup(self, steps_per_epoch: int, epochs: int, total_steps: int | None = None) -> None:
        """Called once by the trainer before training so schedules know the run length
        (``total_steps``: ``epochs x steps_per_epoch`` unless ``train.steps`` ends the last epoch early)."""
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.total_steps = total_steps if total_steps is not None else steps_per_epoch * epochs

    def momentum(self, step: int) -> float:
        """EMA momentum of the teacher/target network: cosine from :attr:`base_momentum` (the
        method's ``method.dino.momentum_teacher`` / ``method.<name>.momentum``) to 1 over all steps
        (DINO's ``cosine_scheduler``, BYOL's ``target_ema``, MoCo v3's ``adjust_moco_momentum``,
        CARE's ``get_param_momentum``: the same formula)."""
        return cosine_schedule(step, self.total_steps, self.base_momentum, 1.0)

    def param_groups(self) -> list[dict]:
        """The optimiser's two parameter groups ``[decayed, not decayed]`` of the student: by default
        DINO's ``get_params_groups`` (no weight decay on biases and 1-D parameters). The trainer
        schedules the first group's weight decay and keeps the second's at 0."""
        return param_groups(self.student)

    def collapse_warning(self, logs: dict) -> str | None:
        """A one-line warning when the logged statistics (floats) say the run is collapsing,
        else None. The trainer checks it on every log step and shows it in the log, the
        progress bar and metrics.jsonl (kind ``collapse``)."""
        return None

    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def forward(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        """:meth:`loss`, so that DistributedDataParallel can wrap the whole method: one forward
        per step however many times the method calls its student (BYOL, MoCo: once per view)."""
        return self.loss(crops, step)

    def before_optimizer_step(self, step: int) -> None:
        """Hook between backward and the optimiser step (e.g. freeze a layer for a while)."""

    def after_step(self, step: int) -> None:
        """Hook after the optimiser step (EMA teacher update)."""

    def backbones(self) -> dict[str, nn.Module]:
        """``{"student": the optimised backbone, "teacher": the EMA one}``."""
        raise NotImplementedError

    def eval_backbone(self, encoder: str = "auto") -> nn.Module:
        """The backbone evaluators use: ``encoder`` (``eval.encoder``) is ``student``, ``teacher``
        or ``auto`` (:attr:`default_eval_encoder`)."""
        return self.backbones()[self.resolve_eval_encoder(encoder)]

    def resolve_eval_encoder(self, encoder: str = "auto") -> str:
        name = self.default_eval_encoder if encoder in (None, "auto") else encoder
        if name not in ("student", "teacher"):
            raise ValueError(f"eval.encoder must be auto, student or teacher, got {encoder!r}")
        return name

    @property
    def num_global_crops(self) -> int:
        return 2
