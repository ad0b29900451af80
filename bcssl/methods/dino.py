"""DINO (Caron et al., 2021) as the BC-SSL paper trains it.

Every detail of PAPER.md section 2 is in this file: the head, the loss over (teacher global view i,
student view j != i) pairs, the centre (EMA 0.9 of the teacher's batch mean, all-reduced, updated
after the loss), teacher temperature warm-up, the EMA teacher (parameters only, momentum cosine
0.996 -> 1, train mode, no gradients) and the last layer frozen during the first epoch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bcssl.engine import distributed as ddp
from bcssl.engine.schedules import teacher_temperature
from bcssl.methods.base import MultiCropWrapper, SSLMethod, backbone_from_config, ema_update, frozen_copy
from bcssl.models.heads import DINOHead

# Collapse thresholds on the entropies normalised by log K (see ``collapse_stats``).
UNIFORM_ENTROPY = 0.95
ONE_HOT_BATCH_ENTROPY = 0.05


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and
    the student distribution of every *other* view, averaged over the pairs."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global: int = 2):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_global = n_global
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int,
                teacher_temp: float) -> torch.Tensor:
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_crops)
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()
        teacher_p = teacher_p.chunk(self.n_global)
        total, n_terms = 0.0, 0
        for i, q in enumerate(teacher_p):
            for j, logp in enumerate(student_logp):
                if j == i:  # the same view seen by both networks is skipped
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                n_terms += 1
        self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        # DINO's update_center: the batch sum all-reduced over the GPUs, divided by the global
        # batch (one all-reduce carries both the sum and the count)
        local = torch.cat([teacher_out.float().sum(dim=0), teacher_out.new_tensor([teacher_out.shape[0]]).float()])
        total = ddp.all_reduce_sum(local)
        batch_center = (total[:-1] / total[-1])[None]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class DINO(SSLMethod):
    """Student = backbone + DINO head on all crops; teacher = EMA copy on the 2 global crops."""

    def __init__(self, model_cfg, method_cfg):
        super().__init__()
        m = method_cfg.dino  # method.dino.*
        self.cfg = m
        self.base_momentum = float(m.momentum_teacher)
        student_backbone = backbone_from_config(model_cfg)
        # As DINO: the teacher is built without stochastic depth, then given the student's weights.
        teacher_backbone = backbone_from_config(model_cfg, drop_path_rate=0.0)

        def head() -> DINOHead:
            return DINOHead(student_backbone.num_features, m.out_dim, m.hidden_dim, m.bottleneck_dim,
                            nlayers=m.head_layers, use_bn=m.use_bn_in_head,
                            norm_last_layer=m.norm_last_layer)

        self.student = MultiCropWrapper(student_backbone, head())
        self.teacher = MultiCropWrapper(teacher_backbone, head())
        frozen_copy(self.teacher, self.student)
        self.dino_loss = DINOLoss(m.out_dim, m.student_temp, m.center_momentum)

    # --- schedules -------------------------------------------------------------------------
    def teacher_temp(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        return teacher_temperature(epoch, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp,
                                   self.cfg.warmup_teacher_temp_epochs)

    # --- training --------------------------------------------------------------------------
    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        # The teacher stays in train mode (its BN uses batch statistics) but never gets gradients.
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out = self.student(crops)
        temp = self.teacher_temp(step)
        logs = {"teacher_temp": temp, **collapse_stats(teacher_out, temp, self.dino_loss.center)}
        loss = self.dino_loss(student_out, teacher_out, len(crops), temp)  # also updates the centre
        return loss, logs

    def before_optimizer_step(self, step: int) -> None:
        # The last layer is frozen during the first `freeze_last_layer` epochs (DINO): cancel its grads.
        if step // self.steps_per_epoch < self.cfg.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def after_step(self, step: int) -> None:
        ema_update(self.teacher.parameters(), self.student.parameters(), self.momentum(step))

    def backbones(self) -> dict[str, nn.Module]:
        return {"student": self.student.backbone, "teacher": self.teacher.backbone}

    def collapse_warning(self, logs: dict) -> str | None:
        # DINO's two failure modes (Caron et al., sec. 5.3): a uniform teacher (centring wins)
        # or one prototype for every image (sharpening wins).
        if logs.get("teacher_entropy", 0.0) > UNIFORM_ENTROPY:
            return (f"collapse: the teacher output is nearly uniform (entropy {logs['teacher_entropy']:.2f} of "
                    "log K); lower method.dino.teacher_temp, raise method.dino.center_momentum or use a BN head")
        if logs.get("teacher_batch_entropy", 1.0) < ONE_HOT_BATCH_ENTROPY:
            return (f"collapse: every image gets the same prototype (batch entropy "
                    f"{logs['teacher_batch_entropy']:.2f} of log K); raise method.dino.teacher_temp")
        return None


@torch.no_grad()
def collapse_stats(teacher_out: torch.Tensor, temp: float, center: torch.Tensor) -> dict:
    """Two collapse signals (DINO's failure modes): the teacher's mean entropy relative to the
    uniform one (-> 1: uniform collapse) and the entropy of its batch-mean distribution
    (-> 0: every image gets the same one-hot output)."""
    p = F.softmax((teacher_out.float() - center) / temp, dim=-1)
    log_k = math.log(p.shape[-1])
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    mean_p = p.mean(0)
    batch_entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    # Tensors, not floats: the trainer reads them only on log steps (no GPU sync every step).
    return {"teacher_entropy": entropy / log_k, "teacher_batch_entropy": batch_entropy / log_k}
