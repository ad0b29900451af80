"""BYOL (Grill et al., 2020) as in its official implementation (deepmind-research/byol).

Every detail is in this file:

- online network = backbone + projector + predictor; projector and predictor are BYOL's
  ``networks.MLP``: Linear(bias) -> BatchNorm -> ReLU -> Linear(no bias), hidden 4096, out 256
  (``method.byol.proj_hidden_dim`` / ``method.byol.proj_dim``); the predictor maps 256 -> 4096 -> 256.
- target network = EMA copy of backbone + projector (parameters only; each network keeps its own
  BN statistics), no gradients, train mode (BN uses batch statistics), built without stochastic
  depth (as DINO's teacher; BYOL's ResNet has none). Momentum tau: cosine from
  ``method.byol.momentum`` (BYOL's ``base_target_ema``: 0.996 for 1000 epochs, 0.99 for 300) to 1
  over all steps,
  ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``. (BYOL initialises the target from another
  seed and reports no difference; we start it as a copy of the online network, as DINO/MoCo.)
- each view goes through the networks on its own (BYOL's ``apply_once_fn`` per view: BN batch
  statistics are per view).
- loss, symmetric, *summed* over the two directions and averaged over the batch (BYOL's
  ``repr_loss = mean(reg(p1, z2') + reg(p2, z1'))``):

      L = mean_b [ (2 - 2 cos(p1_b, z2'_b)) + (2 - 2 cos(p2_b, z1'_b)) ]      in [0, 8]

- views = the first two crops: with ``crops.n_local=0`` and ``crops.global_scale=[0.08, 1.0]`` the
  trainer's multi-crop gives exactly BYOL's asymmetric pair (blur p 1.0 / 0.1, solarize p 0 / 0.2).
- evaluation uses the *online* encoder: BYOL keeps f_theta ("at the end of training we only keep
  the encoder f_theta") and its evaluation reads ``byol_state.online_params``.
- optimiser (the trainer's): BYOL's LARS excludes biases and BN parameters from weight decay and
  the trust ratio (``exclude_bias_from_adaption``), which the default parameter groups give.
- ResNet-50: BYOL's haiku ResNet zero-initialises the last BN of every block (``BlockV1``:
  ``batchnorm_2`` with ``scale_init=jnp.zeros``): ``model.zero_init_last=true`` in its preset.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from bcssl.methods.base import SSLMethod, backbone_from_config, ema_update, frozen_copy


log = logging.getLogger("bcssl")
_warned_crops = False


def warn_unused_crops(crops: list[torch.Tensor]) -> None:
    """Two-view methods use crops[0] and crops[1]; local crops would be computed for nothing."""
    global _warned_crops
    if len(crops) > 2 and not _warned_crops:
        _warned_crops = True
        log.warning("BYOL / MoCo v3 use the 2 global crops only: %d local crops are ignored "
                    "(set crops.n_local=0)", len(crops) - 2)


class BYOLMLP(nn.Sequential):
    """BYOL's projector / predictor: Linear(bias) -> BN -> ReLU -> Linear(no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=True), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False))


class Encoder(nn.Module):
    """backbone + projector: ``forward(x) -> z``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class OnlineNetwork(nn.Module):
    """encoder (backbone + projector) + predictor: ``forward(x) -> (z, p)``. One module, so one
    ``forward`` call covers every trained parameter (what DDP needs)."""

    def __init__(self, encoder: Encoder, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.predictor(z)


def byol_regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``; ``z`` is a target (no gradient)."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1_t: torch.Tensor, z2_t: torch.Tensor) -> torch.Tensor:
    """``mean_b[(2 - 2cos(p1, z2')) + (2 - 2cos(p2, z1'))]``: the two directions are summed."""
    return (byol_regression_loss(p1, z2_t) + byol_regression_loss(p2, z1_t)).mean()


@torch.no_grad()
def representation_collapse_warning(logs: dict, dim: int) -> str | None:
    """BYOL / MoCo v3: warn when the online projections' per-dimension std (normalised) falls
    below a tenth of the 1/sqrt(d) of a spread-out representation: all images map to one point."""
    std = logs.get("proj_std")
    if std is not None and std * dim ** 0.5 < 0.1:
        return (f"collapse: the online projections have std {std:.4f} (x sqrt(d) = {std * dim ** 0.5:.3f}, "
                "about 1 when healthy); check the lr, the predictor and the EMA momentum")
    return None


@torch.no_grad()
def representation_stats(z_online: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> dict:
    """Collapse signals for BYOL / MoCo v3: the per-dimension std of the L2-normalised online
    projections, averaged over dimensions (about 1/sqrt(d) when spread, -> 0 when every image
    maps to one point), and the mean cosine between the two views' targets (-> 1 alone is fine;
    -> 1 with the std -> 0 is collapse)."""
    zn = F.normalize(z_online.float(), dim=-1)
    std = zn.std(dim=0).mean()
    cos = F.cosine_similarity(k1.float(), k2.float(), dim=-1).mean()
    # Tensors, not floats: the trainer reads them only on log steps (no GPU sync every step).
    return {"proj_std": std, "target_cos": cos}


def target_encoder(model_cfg, encoder: Encoder) -> Encoder:
    """The EMA target / momentum encoder of ``encoder``: backbone built without stochastic depth
    (as DINO's teacher) + a copy of the projector, given the online weights, no gradients."""
    return frozen_copy(Encoder(backbone_from_config(model_cfg, drop_path_rate=0.0), copy.deepcopy(encoder.projector)),
                       encoder)


class OnlineTargetMethod(SSLMethod):
    """What BYOL, MoCo v3 and CARE share: ``student.encoder`` is averaged into ``teacher`` after
    each step (parameters only), the online backbone is evaluated by default (as BYOL's and MoCo
    v3's official evaluation scripts do), and collapse is read from the spread of the online
    projections."""

    default_eval_encoder = "student"

    def after_step(self, step: int) -> None:
        ema_update(self.teacher.parameters(), self.student.encoder.parameters(), self.momentum(step))

    def backbones(self) -> dict[str, nn.Module]:
        return {"student": self.student.encoder.backbone, "teacher": self.teacher.backbone}

    def collapse_warning(self, logs: dict) -> str | None:
        return representation_collapse_warning(logs, self.cfg.proj_dim)


class BYOL(OnlineTargetMethod):
    """Online network (``student``) regresses the EMA target network's projection of the other view."""

    def __init__(self, model_cfg, method_cfg):
        super().__init__()
        m = method_cfg.byol  # method.byol.*
        self.cfg = m
        self.base_momentum = float(m.momentum)
        backbone = backbone_from_config(model_cfg)
        encoder = Encoder(backbone, BYOLMLP(backbone.num_features, m.proj_hidden_dim, m.proj_dim))
        self.student = OnlineNetwork(encoder, BYOLMLP(m.proj_dim, m.proj_hidden_dim, m.proj_dim))
        self.teacher = target_encoder(model_cfg, encoder)

    def loss(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        warn_unused_crops(crops)
        x1, x2 = crops[0], crops[1]
        z1, p1 = self.student(x1)
        z2, p2 = self.student(x2)
        # The target stays in train mode (BN batch statistics) and never gets gradients.
        with torch.no_grad():
            z1_t = self.teacher(x1)
            z2_t = self.teacher(x2)
        loss = byol_loss(p1, p2, z1_t, z2_t)
        return loss, {"momentum": self.momentum(step), **representation_stats(z1, z1_t, z2_t)}

