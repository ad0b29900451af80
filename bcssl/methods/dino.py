"""DINO (Caron et al., 2021) as the BC-SSL paper trains it.

Every detail of the paper's DINO recipe (docs/recipe.md section 2) is in this file: the head, the loss over (teacher global view i,
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


CENTERINGS = ("centre", "sinkhorn_knopp")


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher centring (facebookresearch/dinov2 dinov2/loss/dino_clstoken_loss.py,
    ``sinkhorn_knopp_teacher``; SwAV's): exp(logits / temp) scaled by alternate row and column
    sums so every prototype gets an equal share of the (global) batch and every sample one unit
    of assignment. Returns (B, K) rows that each sum to 1. Each prototype's maximum over the
    global batch is subtracted before exp, so a sharp temperature cannot overflow: the first row
    normalisation divides that factor out again, so the result is the same as without it."""
    logits = teacher_out.float() / temp
    q = torch.exp(logits - ddp.all_reduce_max(logits.max(dim=0, keepdim=True).values)).t()  # (K, B)
    n_samples = ddp.all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    k = q.shape[0]
    q /= ddp.all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= ddp.all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: 1/B
        q /= n_samples
    return (q * n_samples).t()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate (Sablayrolles et al. 2019), DINOv2's KoLeo regulariser
    (facebookresearch/dinov2 dinov2/loss/koleo_loss.py): minus the mean log distance of each
    L2-normalised feature to its nearest neighbour in the batch; minimising it spreads the batch."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and
    the student distribution of every *other* view, averaged over the pairs.

    ``centering='centre'`` (DINO, the default): softmax((teacher - centre) / temp) with the centre
    an EMA of the teacher's batch means; ``'sinkhorn_knopp'`` (DINOv2's option): the teacher's
    batch is balanced over the prototypes by :func:`sinkhorn_knopp` instead (the centre is then
    not used)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global: int = 2, centering: str = "centre"):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"method.dino.centering must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.n_global = n_global
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's target distribution of every global view, (n_global x B, K)."""
        if self.centering == "sinkhorn_knopp":
            return torch.cat([sinkhorn_knopp(t, teacher_temp) for t in teacher_out.chunk(self.n_global)])
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int,
                teacher_temp: float, teacher_p: torch.Tensor | None = None) -> torch.Tensor:
        """``teacher_p``: :meth:`teacher_probs` of ``teacher_out`` when the caller has them already."""
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_crops)
        if teacher_p is None:
            teacher_p = self.teacher_probs(teacher_out, teacher_temp)
        teacher_p = teacher_p.detach().chunk(self.n_global)
        total, n_terms = 0.0, 0
        for i, q in enumerate(teacher_p):
            for j, logp in enumerate(student_logp):
                if j == i:  # the same view seen by both networks is skipped
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                n_terms += 1
        if self.centering == "centre":
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
        self.dino_loss = DINOLoss(m.out_dim, m.student_temp, m.center_momentum, centering=m.centering)
        self.koleo_weight = float(m.koleo_weight)

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
        temp = self.teacher_temp(step)
        teacher_p = self.dino_loss.teacher_probs(teacher_out, temp)
        logs = {"teacher_temp": temp, **collapse_stats_of(teacher_p)}
        if self.koleo_weight:
            student_out, features = self.student(crops, return_features=True)
        else:
            student_out = self.student(crops)
        loss = self.dino_loss(student_out, teacher_out, len(crops), temp, teacher_p)  # also updates the centre
        if self.koleo_weight:  # DINOv2: on the student's backbone features of each global view
            koleo = sum(koleo_loss(f) for f in features[:teacher_out.shape[0]].chunk(2))
            logs["koleo"] = koleo.detach()
            loss = loss + self.koleo_weight * koleo
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
    return collapse_stats_of(F.softmax((teacher_out.float() - center) / temp, dim=-1))


@torch.no_grad()
def collapse_stats_of(p: torch.Tensor) -> dict:
    """:func:`collapse_stats` of the teacher's target distributions ``p`` (B, K)."""
    log_k = math.log(p.shape[-1])
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    mean_p = p.mean(0)
    batch_entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    # Tensors, not floats: the trainer reads them only on log steps (no GPU sync every step).
    return {"teacher_entropy": entropy / log_k, "teacher_batch_entropy": batch_entropy / log_k}
