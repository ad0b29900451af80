"""The pre-training loop: one readable function over (epoch, step), DINO-style.

Exact resume: everything random in a step is derived from (seed, step) (multi-crop parameters,
stochastic depth) and the data order from (seed, epoch), so a run restarted from a mid-epoch
checkpoint replays the remaining steps bit for bit.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bcssl.data import BatchLoader, WorkerPhotometric, pretraining_dataset, probe_readable
from bcssl.data.shards import ShardLoader, TarShards
from bcssl.data.multicrop import multicrop_from_config
from bcssl.engine import checkpoint as ckpt
from bcssl.engine import distributed as ddp
from bcssl.engine.amp import autocast as amp_autocast
from bcssl.engine.optim import build_optimizer
from bcssl.engine.run_dir import MetricsLog, check_resume_config, run_dir_of, save_config
from bcssl.engine.runtime import TrainingError, build_method, step_seed
from bcssl.engine.schedules import cosine_schedule
from bcssl.engine.trackers import open_trackers
from bcssl.methods import SSLMethod

log = logging.getLogger("bcssl")


PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")  # Slurm/Kubernetes preemption, `scancel --signal=USR1`


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 while training: the loop then saves a checkpoint at the next step
    boundary and returns normally (exit code 0), so a requeued job resumes where this one stopped."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only go to the main thread
            for name in PREEMPT_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def clip_gradients_per_param(model: torch.nn.Module, clip: float) -> None:
    """DINO's ``clip_gradients``: each parameter's gradient norm is clipped to ``clip`` on its own."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    images_seen: int
    train_s: float
    imgs_per_s: float
    knn_top1: float | None
    nonfinite_steps: int
    preempted: str | None = None  # the signal that stopped the run early (checkpoint saved), if any
    world_size: int = 1
    skipped_images: int = 0  # unreadable files dropped from batches, all processes and epochs of this call

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compile_student(method: SSLMethod, backend: str) -> None:
    """``train.compile``: the student's backbone and head (or the whole student) compiled in place
    (``nn.Module.compile``), so state_dict keys and checkpoints are unchanged; one graph per crop
    size."""
    parts = [getattr(method.student, k, None) for k in ("backbone", "head")]
    for part in [p for p in parts if p is not None] or [method.student]:
        part.compile(backend=backend, dynamic=False)


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def write(self, *args, **kwargs) -> None:
        pass

    def summary(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: DictConfig, *, knn_eval=None, resume_changed: bool = False, train_set=None) -> TrainResult:
    """Pre-train with ``cfg``; resumes from ``<run_dir>/checkpoint.pt`` when one exists.

    A run folder belongs to the config it was started with (its ``config.yaml``): resuming with
    another is a ConfigError naming the differing keys, unless ``resume_changed`` (CLI
    ``--resume-changed``) and they are all keys a run may change (``run_dir.RESUME_CHANGEABLE``:
    ``train.epochs``, logging, evaluation settings); config.yaml then becomes the new config.

    ``train_set``: a map-style dataset of images to pre-train on instead of ``data.*``
    (:class:`~bcssl.data.python_dataset.PythonImages` says what its items may be).

    ``knn_eval(method, epoch) -> dict`` (optional) is the k-NN monitor called every
    ``eval.knn_every`` epochs and after the last one (on every rank: each encodes its shard).

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its slice of every global batch
    (``train.batch_size`` per process) with DDP and SyncBatchNorm; rank 0 alone logs
    and writes checkpoints. SIGTERM/SIGUSR1 save a checkpoint and return early (``preempted``).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist, device = ddp.init_distributed(cfg.device)
    try:
        with PreemptionFlag() as preempt:
            return _train(cfg, knn_eval, dist, device, preempt, resume_changed, train_set)
    finally:
        if dist.enabled:
            ddp.shutdown_distributed()


def scaled_lr(cfg: DictConfig, world_size: int) -> float:
    """``train.lr`` at the global batch: ``lr * batch_size * world_size / 256`` (DINO's linear scaling rule)."""
    return cfg.train.lr * cfg.train.batch_size * world_size / 256


def _pretraining_loader(cfg: DictConfig, dataset, *, rank: int = 0, world_size: int = 1, crops=None,
                        photometric=None, device: torch.device | None = None):
    """The loader ``train`` reads ``dataset`` with: tar shards stream through
    :class:`~bcssl.data.shards.ShardLoader`, everything else through :class:`BatchLoader`."""
    pin = device is not None and device.type == "cuda"
    if isinstance(dataset, TarShards):
        return ShardLoader(dataset, cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                           workers=cfg.data.workers, crops=crops, photometric=photometric, pin_memory=pin,
                           limit=cfg.data.limit)
    return BatchLoader(dataset, cfg.train.batch_size, seed=cfg.seed, shuffle=True, drop_last=True,
                       workers=cfg.data.workers, pin_memory=pin, limit=cfg.data.limit, rank=rank,
                       world_size=world_size, crops=crops, decode_device=device, photometric=photometric)


def _run_length(cfg: DictConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(epochs, total steps)``: ``train.epochs`` full epochs, or ``train.steps`` (bcssl demo's
    budget), which ends the last epoch early."""
    if cfg.train.steps:
        return math.ceil(int(cfg.train.steps) / steps_per_epoch), int(cfg.train.steps)
    return int(cfg.train.epochs), steps_per_epoch * int(cfg.train.epochs)


def run_plan(cfg: DictConfig, world_size: int = 1) -> dict:
    """What ``train(cfg)`` on ``world_size`` processes would do, without doing it (``pretrain
    --dry-run``): images, steps, global batch, learning rate, and the model's size (parameters of
    the student and of the backbone, backbone MACs per image at the global and local crop sizes)."""
    from bcssl.models.complexity import count_macs, count_params

    loader = _pretraining_loader(cfg, pretraining_dataset(cfg), world_size=world_size,
                                 crops=multicrop_from_config(cfg.crops).cfg)
    steps = len(loader)
    epochs, total = _run_length(cfg, steps)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg)
    backbone = method.eval_backbone("student")
    c = cfg.crops
    return {"run_dir": str(run_dir_of(cfg)), "images": loader.num_items, "world_size": world_size,
            "global_batch": loader.global_batch_size, "steps_per_epoch": steps,
            "epochs": epochs,
            "total_steps": total, "warmup_steps": min(cfg.train.warmup_epochs * steps, total),
            "lr": scaled_lr(cfg, world_size), "min_lr": cfg.train.min_lr,
            "student_params": count_params(method.student, trainable_only=True),
            "backbone_params": count_params(backbone),
            "backbone_gmacs_global": count_macs(backbone, c.global_size) / 1e9,
            "backbone_gmacs_local": count_macs(backbone, c.local_size) / 1e9 if c.n_local else None,
            "crops": f"{2} x {c.global_size} px + {c.n_local} x {c.local_size} px"}


def _train(cfg: DictConfig, knn_eval, dist: ddp.DistInfo, device: torch.device, preempt: PreemptionFlag,
           resume_changed: bool, train_set=None) -> TrainResult:
    run_dir = run_dir_of(cfg)
    # --- run identity: a checkpoint resumes only under the config its run was started with
    resume_path, state, changes = ckpt.latest(run_dir), None, {}
    if resume_path is not None:
        if (run_dir / "config.yaml").is_file():
            changes = check_resume_config(run_dir, cfg, resume_changed)
        else:  # a folder from before config.yaml was kept: the checkpoint holds the config too
            state = ckpt.load(resume_path, map_location=device)
            if state.get("config"):
                changes = check_resume_config(run_dir, cfg, resume_changed, started=OmegaConf.create(state["config"]))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # Image files: each image's crops are cut from the original in the loader's workers (CropBatch);
    # in-memory sets: uint8 batches, cropped on the device. Both get the photometric part there, except
    # when training on the CPU with workers: they are CPU cores beside the step, so they finish the crops.
    if train_set is not None:  # a dataset given in Python: read as image files are (crops in the workers)
        from bcssl.data.python_dataset import PythonImages

        dataset = PythonImages(train_set)
        log.info("pre-training on %r (given in Python, not data.*)", dataset)
    else:
        dataset = pretraining_dataset(cfg)
    multicrop = multicrop_from_config(cfg.crops)
    global_batch_size = cfg.train.batch_size * dist.world_size
    in_workers = device.type == "cpu" and cfg.data.workers > 0 and not cfg.data.decode_on_device
    photometric = WorkerPhotometric(multicrop.cfg, partial(step_seed, cfg.seed), global_batch_size) \
        if in_workers else None
    loader = _pretraining_loader(cfg, dataset, rank=dist.rank, world_size=dist.world_size, crops=multicrop.cfg,
                                 photometric=photometric, device=device)
    if loader.may_drop_images and hasattr(dataset, "open"):
        probe_readable(dataset)  # a folder of unreadable files stops here, not after an empty epoch
    steps_per_epoch = len(loader)  # >= 1: both loaders refuse a set without a full global batch
    epochs, total_steps = _run_length(cfg, steps_per_epoch)
    base_lr = scaled_lr(cfg, dist.world_size)
    warmup_steps = min(cfg.train.warmup_epochs * steps_per_epoch, total_steps)

    torch.manual_seed(cfg.seed)  # model initialisation
    method = build_method(cfg)
    method.setup(steps_per_epoch, epochs, total_steps)
    if dist.enabled:  # every BN sees the global batch, as in one process (BC-SSL has one per block)
        method = ddp.convert_sync_batchnorm(method, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method.to(device=device, memory_format=memory_format)
    if cfg.train.compile:
        compile_student(method, cfg.train.compile_backend)
    try:
        optimizer = build_optimizer(cfg.train.optimizer, method.param_groups(), lr=base_lr,
                                    weight_decay=cfg.train.weight_decay, momentum=cfg.train.momentum,
                                    fused=device.type == "cuda")
    except ValueError as e:
        raise TrainingError(f"train.optimizer: {e}") from None
    amp = cfg.train.amp
    if amp == "fp16" and device.type != "cuda":
        raise TrainingError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 or none on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    autocast = amp_autocast(amp, device)

    # One DDP forward per step = the method's whole loss (students called once per view inside);
    # the teacher/target has no gradients, so DDP only averages the student's.
    step_fn = method
    if dist.enabled:
        step_fn = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
            gradient_as_bucket_view=True)

    # --- resume -------------------------------------------------------------------------------
    start_step, train_s, nonfinite_total, images_seen, knn_top1 = 0, 0.0, 0, 0, None
    resume_path = ckpt.latest(run_dir)
    if resume_path is not None:
        state = state or ckpt.load(resume_path, map_location=device)
        try:
            method.load_state_dict(state["method"])
        except RuntimeError as e:  # a checkpoint of another bcssl version's model, say
            raise TrainingError(f"{resume_path} does not fit the model of this config "
                                f"({str(e).splitlines()[0]}); start a new run with another run.name=...") from None
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, train_s = int(state["step"]), float(state["train_s"])
        nonfinite_total, images_seen = int(state["nonfinite_total"]), int(state["images_seen"])
        knn_top1 = state.get("knn_top1")
        log.info("resuming %s at step %d/%d", run_dir, start_step, total_steps)
    if dist.is_main:
        if resume_path is None or changes:  # config.yaml: the config the run started with, or was changed to
            save_config(cfg, run_dir)
        resume_step = start_step if resume_path else None
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step,
                             trackers=open_trackers(cfg, run_dir, resume_step))
        if changes:
            log.info("resuming with changed %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
            metrics.write("config", start_step, changed={k: [a, b] for k, (a, b) in changes.items()})
    else:
        metrics = _NoMetrics()

    def save_checkpoint(next_step: int) -> None:
        if not dist.is_main:
            return
        ckpt.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict(), "step": next_step, "epoch": next_step // steps_per_epoch,
                   "train_s": train_s, "nonfinite_total": nonfinite_total, "images_seen": images_seen,
                   "knn_top1": knn_top1, "config": OmegaConf.to_container(cfg, resolve=True)},
                  run_dir / "checkpoint.pt")

    # --- train --------------------------------------------------------------------------------
    method.train()
    nonfinite_streak, collapse_warned, stopped_by = 0, False, None
    step = start_step
    for epoch in range(start_step // steps_per_epoch, epochs):
        first = step % steps_per_epoch if epoch == start_step // steps_per_epoch else 0
        bar = tqdm(loader.epoch(epoch, start_step=first), total=steps_per_epoch, initial=first,
                   desc=f"epoch {epoch + 1}/{epochs}", disable=not (cfg.train.progress and dist.is_main),
                   dynamic_ncols=True)
        t_log, n_log, empty_steps = time.perf_counter(), 0, 0
        for batch in bar:
            if step >= total_steps:  # train.steps ends the last epoch early
                break
            n = len(batch) if loader.makes_crops else batch[0].shape[0]
            empty = n == 0  # every image of this batch was unreadable (counted by the loader)
            global_batch = n * dist.world_size
            if dist.enabled and loader.may_drop_images:
                # A rank that skipped alone would leave the others waiting in the step's collectives
                # (DDP, SyncBN, the DINO centre): all skip if any rank's batch is empty. Dropped
                # images make the ranks' batches differ, so the global batch is summed, not multiplied.
                global_batch, n_empty = ddp.all_reduce_sum(torch.tensor([n, int(empty)], device=device)).tolist()
                empty = n_empty > 0
            if empty:
                step += 1
                empty_steps += 1
                continue
            t0 = time.perf_counter()
            lr = cosine_schedule(step, total_steps, base_lr, cfg.train.min_lr, warmup_steps)
            wd = cosine_schedule(step, total_steps, cfg.train.weight_decay, cfg.train.weight_decay_end)
            optimizer.param_groups[0].update(lr=lr, weight_decay=wd)
            optimizer.param_groups[1].update(lr=lr)

            if loader.makes_crops:  # photometric parameters per position in the global batch
                batch = batch.to(device, non_blocking=True)
                crops = batch.views or multicrop.from_crops(batch.groups, step_seed(cfg.seed, step), batch.positions,
                                                            loader.global_batch_size)
            else:
                images = batch[0].to(device, non_blocking=True)
                crops = multicrop(images, step_seed(cfg.seed, step), rank=dist.rank, world_size=dist.world_size)
            crops = [c.contiguous(memory_format=memory_format) for c in crops]
            torch.manual_seed(step_seed(cfg.seed + 1, step))  # stochastic depth
            with autocast:
                loss, logs = step_fn(crops, step)

            # One all-reduce per step tells every rank whether any rank saw a non-finite loss or a
            # preemption signal, so all skip, or stop, at the same step.
            nonfinite, preempted = ddp.any_process([not bool(torch.isfinite(loss)), preempt.signal is not None],
                                                   device)
            if preempted:  # before the update: the checkpoint below holds the weights of `step`
                stopped_by = preempt.signal or "another process's signal"
                break
            if nonfinite:
                # Skip the update (no optimiser step, no EMA) and count it; a long streak stops the run.
                nonfinite_streak += 1
                nonfinite_total += 1
                optimizer.zero_grad(set_to_none=True)
                metrics.write("nonfinite", step, epoch=epoch, loss=loss.item())
                if nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    save_checkpoint(step + 1)
                    raise TrainingError(
                        f"the loss was non-finite for {nonfinite_streak} steps in a row (step {step}); "
                        "lower train.lr, use train.amp=none or bf16, or check the data")
                step += 1
                continue
            nonfinite_streak = 0

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if cfg.train.clip_grad > 0:
                clip_gradients_per_param(method.student, cfg.train.clip_grad)
            method.before_optimizer_step(step)
            scaler.step(optimizer)
            scaler.update()
            method.after_step(step)

            step += 1
            images_seen += global_batch
            n_log += global_batch
            train_s += time.perf_counter() - t0
            if step % cfg.train.log_every_steps == 0 or step % steps_per_epoch == 0 or step == total_steps:
                dt = time.perf_counter() - t_log
                loss_value = ddp.all_reduce_mean(loss.detach().float()).item()  # the global batch's loss
                values = {"loss": loss_value, "lr": lr, "wd": wd,
                          "imgs_per_s": n_log / max(dt, 1e-9),
                          **{k: float(v) for k, v in logs.items()}}
                metrics.write("train", step, epoch=step / steps_per_epoch, **values)
                postfix = dict(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{values['imgs_per_s']:.0f}")
                warning = method.collapse_warning(values)
                if warning and dist.is_main:
                    postfix["WARN"] = "collapsing"
                    metrics.write("collapse", step, epoch=step / steps_per_epoch, message=warning)
                    if not collapse_warned:
                        log.warning("step %d: %s", step, warning)
                        collapse_warned = True
                bar.set_postfix(refresh=False, **postfix)
                t_log, n_log = time.perf_counter(), 0
            if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0 \
                    and step % steps_per_epoch:
                save_checkpoint(step)
        bar.close()
        if stopped_by:
            break
        if empty_steps == steps_per_epoch - first > 0:
            raise TrainingError(f"no batch of epoch {epoch + 1} could be read ({loader.skipped} unreadable files "
                                f"skipped on this process); check data.root")
        last = epoch + 1 == epochs
        every = cfg.eval.knn_every
        if knn_eval is not None and ((every and (epoch + 1) % every == 0) or (last and cfg.eval.final_knn)):
            result = knn_eval(method, epoch + 1)  # every rank encodes its shard; all get the result
            knn_top1 = result["top1"]
            metrics.write("knn", step, epoch=step / steps_per_epoch, top1=result["top1"], top5=result["top5"])
            if dist.is_main:
                log.info("epoch %d: k-NN top-1 %.2f%%", epoch + 1, knn_top1)
            method.train()
        save_checkpoint(step)
        ddp.barrier()
    if stopped_by:  # preemption: save where we are and return normally, so the job exits 0
        save_checkpoint(step)
        ddp.barrier()
        log.warning("%s: checkpoint saved at step %d/%d; rerun the same command to resume",
                    stopped_by, step, total_steps)
        metrics.write("preempted", step, epoch=step / steps_per_epoch, signal=stopped_by)
    skipped = loader.skipped
    if dist.enabled and loader.may_drop_images:  # each rank counted the files of its own slices
        skipped = int(ddp.all_reduce_sum(torch.tensor(skipped, device=device)).item())
    if skipped:
        metrics.write("data", step, skipped_images=skipped)
        if dist.is_main:
            log.warning("%d unreadable image file(s) were skipped (the first is named above)", skipped)
    result = TrainResult(run_dir=str(run_dir), epochs=epochs, images_seen=images_seen, train_s=train_s,
                         imgs_per_s=images_seen / max(train_s, 1e-9), knn_top1=knn_top1,
                         nonfinite_steps=nonfinite_total, preempted=stopped_by, world_size=dist.world_size,
                         skipped_images=skipped)
    if not stopped_by:
        metrics.summary(step, **{k: v for k, v in result.as_dict().items() if k not in ("run_dir", "preempted")})
    metrics.close()
    return result
