"""Multi-process training with PyTorch's own stack: ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK,
we join the process group (NCCL on GPUs, gloo on CPUs), convert every BatchNorm to SyncBatchNorm
and wrap the student in DistributedDataParallel.

One thing is added: ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU (gloo: tests, CPU
clusters) :class:`CPUSyncBatchNorm` computes the same global batch statistics with a differentiable
all-reduce of per-channel sums. On GPUs it is exactly ``torch.nn.SyncBatchNorm``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bcssl.engine.runtime import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); returns this
    process's rank info and its device (``cuda:LOCAL_RANK`` on GPUs). The device is resolved
    before the group is joined: a missing CUDA is one clear error in one process or many."""
    world = env_world_size()
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # a long timeout: rank 0 writes checkpoints and the evaluation results while others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank), device


@contextlib.contextmanager
def process_group(device_name: str):
    """``with process_group(cfg.device) as (info, device):`` :func:`init_distributed` for a command
    that may run under torchrun (an evaluation); leaves the group on exit only when it joined it
    here, so an evaluation called inside training (the k-NN monitor) keeps the trainer's group."""
    joined_before = dist.is_available() and dist.is_initialized()
    info, device = init_distributed(device_name)
    try:
        yield info, device
    finally:
        if info.enabled and not joined_before:
            shutdown_distributed()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of all processes concatenated along dim 0 in rank order, no gradient (MoCo v3's
    ``concat_all_gather``); a single process gets its own tensor back. Every process must pass the
    same shape."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def _comm_device(device: torch.device) -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under NCCL, else where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of all processes concatenated along dim 0 in rank order when their lengths
    differ (each rank's shard of a dataset); a single process gets its own tensor back.

    Padded to the longest and trimmed after the gather. A rank with no rows may pass
    ``torch.empty(0)`` (of the right dtype): the other dims come from the ranks that have rows.
    Under NCCL the gather runs on the rank's GPU; the result is on ``tensor``'s device."""
    if not is_distributed():
        return tensor
    comm = _comm_device(tensor.device)
    shape = torch.zeros(9, dtype=torch.int64, device=comm)  # rows, ndim, up to 7 more dims
    shape[0], shape[1] = tensor.shape[0], tensor.ndim
    if tensor.ndim > 1:
        shape[2:1 + tensor.ndim] = torch.tensor(tensor.shape[1:], dtype=torch.int64)
    shapes = all_gather_cat(shape.view(1, -1)).cpu()
    sizes = shapes[:, 0].tolist()
    full = next((s for s in shapes.tolist() if s[0] > 0), None)
    if full is None:
        return tensor
    rest = tuple(full[2:2 + full[1] - 1])
    longest = max(sizes)
    padded = torch.zeros((longest, *rest), dtype=tensor.dtype, device=comm)
    if sizes[rank()]:
        padded[:sizes[rank()]] = tensor.to(comm)
    gathered = all_gather_cat(padded)
    parts = [gathered[r * longest:r * longest + n] for r, n in enumerate(sizes)]
    return torch.cat(parts).to(tensor.device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over the processes (itself in a single process); no gradient."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``value`` over the processes (itself in a single process); no gradient."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over the processes (itself in a single process)."""
    if not is_distributed():
        return value
    return all_reduce_sum(value) / dist.get_world_size()


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag made true on every process when it is true on at least one (a non-finite loss
    or a preemption signal that reached only some ranks), in one all-reduce: all ranks then
    skip or stop at the same step."""
    if not is_distributed():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t)
    return [bool(v > 0) for v in t.tolist()]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes with a gradient: every process's output is the sum of all inputs, so each
    input's gradient is the sum over processes of the gradients reaching the outputs.
    (``torch.distributed.nn.functional.all_reduce`` is deprecated, and the functional collectives
    it points to have no autograd formula for all_reduce.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        # None for the default group: an output's grad_fn outlives backward, and a ProcessGroup
        # kept alive by it is destroyed only at interpreter exit, where gloo's threads can abort
        # the process ("terminate called without an active exception")
        ctx.group = None if group is None or group is dist.group.WORLD else group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum all-reduce (see :class:`_AllReduceSum`)."""
    return _AllReduceSum.apply(x, group)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm for CPU tensors (gloo), which ``nn.SyncBatchNorm`` refuses (and DDP
    refuses ``nn.SyncBatchNorm`` in CPU modules). The same statistics: mean and biased variance
    over the whole global batch to normalise, the unbiased variance for the running estimate.
    Not a ``nn.SyncBatchNorm`` subclass on purpose; same state_dict as the BatchNorm it replaces."""

    process_group = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sync = (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)
        if not sync:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        group = self.process_group
        c = input.shape[1]
        n_local = torch.tensor([input.numel() / c], dtype=torch.float32)
        # two passes (mean, then squared deviations): E[x^2] - E[x]^2 loses digits when |mean| >> std
        stats = all_reduce_sum_with_grad(torch.cat([x.sum(dims), n_local]), group)
        n = stats[-1]
        mean = stats[:c] / n
        shape = [1, c] + [1] * (input.dim() - 2)
        var = all_reduce_sum_with_grad((x - mean.view(shape)).pow(2).sum(dims), group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cuda") -> nn.Module:
    """Every ``BatchNorm*d`` in ``module`` becomes synchronised across processes (same
    state_dict): ``nn.SyncBatchNorm`` for GPU modules, :class:`CPUSyncBatchNorm` for CPU ones."""
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = CPUSyncBatchNorm
    return module


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """``bcssl pretrain --nproc N ...``: run the same command under ``torchrun --standalone``
    (one node, N processes) and return its exit code."""
    import subprocess

    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", "bcssl", *argv]
    return subprocess.call(cmd)


__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "is_distributed", "rank", "world_size",
           "all_gather_cat", "all_gather_uneven", "all_reduce_sum", "all_reduce_mean", "any_process", "barrier",
           "CPUSyncBatchNorm", "all_reduce_sum_with_grad", "convert_sync_batchnorm", "relaunch_with_torchrun", "env_world_size", "env_rank",
           "process_group"]
