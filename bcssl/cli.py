"""The ``bcssl`` command line. Each subcommand is a thin call into the library.

Errors a user can fix (bad config key, missing dataset, unreadable checkpoint) print one line
on stderr and exit non-zero; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EPILOG = """examples:
  bcssl demo                                        # Fashion-MNIST, CPU, ~15 min
  bcssl pretrain --config demo_fmnist train.epochs=2
  bcssl pretrain --config imagenet_bcssl_t_300ep data.root=/data/imagenet
  bcssl pretrain --nproc 8 --config imagenet_bcssl_t_300ep data.root=/data/imagenet   # 8 GPUs (torchrun)
  bcssl eval --help                                 # every evaluation, one line each
  bcssl eval knn runs/demo
  bcssl eval knn RUN --nproc 8                       # each process encodes its shard
  bcssl eval linear runs/demo
  bcssl eval robustness runs/demo --limit 500
  bcssl eval detection runs/imagenet_bcssl_t_300ep detection.root=/data/coco --nproc 8
  bcssl bench throughput --models bcssl_t,swin_t --batch 16
  bcssl viz cam runs/demo
  bcssl viz crops --config imagenet_bcssl_t_100ep --images ./photos --json
  bcssl report runs/demo
  bcssl sweep --config sweep_fmnist --grid model.kernel_size=3,5,7,9,15 model.dw_norm=ln,bn+ln
  bcssl export runs/demo --format onnx               # also safetensors, torchscript, timm
  bcssl presets
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


class _Parser(argparse.ArgumentParser):
    """argparse, plus: with ``--json`` on the command line a usage error also ends with the JSON error line."""

    json_errors = False

    def error(self, message):
        if _Parser.json_errors:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            print(json.dumps({"error": message, "kind": "UsageError"}), flush=True)
            raise SystemExit(2)
        super().error(message)


def _chosen_eval(argv: list[str] | None) -> str | None:
    """``NAME`` of ``bcssl eval NAME ...``: only that evaluation's module is imported to add its options."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return words[1] if len(words) > 1 and words[0] == "eval" else None


def _add_eval_parsers(sub, argv: list[str] | None) -> None:
    from bcssl.eval.registry import REGISTRY, get

    width = max(len(e.name) for e in REGISTRY)
    listing = "\n".join(f"  {e.name:{width}s}  {e.help}" for e in REGISTRY)
    p = sub.add_parser("eval", help="evaluate a run: " + ", ".join(e.name for e in REGISTRY),
                       description=f"Evaluate a run; each writes RUN/<name>.json.\n\nevaluations:\n{listing}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="eval_command", metavar="EVALUATION")
    chosen = _chosen_eval(argv)
    for e in REGISTRY:
        ep = esub.add_parser(e.name, description=e.help)  # listed once, one line each, in the description
        ep.add_argument("run", help="run directory (contains config.yaml and checkpoint.pt)")
        ep.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides on top of the run's config.yaml, e.g. device=cpu eval.batch_size=128")
        if e.name == chosen:
            ev = get(e.name)
            before = {a.dest for a in ep._actions}
            ev.add_arguments(ep)
            ep.set_defaults(eval_options=[a.dest for a in ep._actions if a.dest not in before])
            if ev.distributed:
                ep.add_argument("--nproc", type=int, default=None,
                                help="processes on this machine (one per GPU): reruns the command under "
                                     "`torchrun --standalone --nproc_per_node=N`")
        _add_common(ep)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="bcssl", description="Self-supervised pre-training of large-kernel CNNs "
                                     "(BC-SSL) with DINO.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from importlib.metadata import version  # not `import torch`: --help stays instant

    from bcssl import __version__
    parser.add_argument("--version", action="version", version=f"bcssl {__version__} (torch {version('torch')})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pre-train a backbone (resumes when the run directory has a checkpoint)")
    p.add_argument("--config", required=True, help="preset name (see `bcssl presets`) or a YAML file")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (one per GPU): reruns the command under `torchrun --standalone "
                        "--nproc_per_node=N`; train.batch_size is per process")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, model size, steps, global batch and learning rate, then exit "
                        "without training or creating anything")
    p.add_argument("--resume-changed", action="store_true",
                   help="resume a run whose config differs from the one it started with in keys a run may change "
                        "(train.epochs, train.steps, train.log_every_steps, train.checkpoint_every_steps, log.*, "
                        "eval.*, linear.*, "
                        "detection.*); without it any difference is refused")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=10")
    _add_common(p)

    p = sub.add_parser("config", help="inspect configurations")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    c = csub.add_parser("show", help="print the resolved configuration of a preset or YAML file with overrides")
    c.add_argument("config", help="preset name (see `bcssl presets`) or a YAML file")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-3")
    _add_common(c)

    p = sub.add_parser("demo", help="pre-train a small BC-SSL on Fashion-MNIST and report k-NN vs baselines")
    p.add_argument("--config", default="demo_fmnist", help="preset (default demo_fmnist: 15 min on any machine; "
                   "demo_fmnist_long: 60 min)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="wall-clock minutes for the whole command (baselines, training, evaluation, report): "
                        "the demo times its first steps and trains as long as fits (default: the preset's "
                        "demo.budget_min: 15 for demo_fmnist, 60 for demo_fmnist_long; an explicit train.epochs "
                        "or train.steps override fixes the length instead)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. threads=2")
    _add_common(p)

    _add_eval_parsers(sub, argv)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    b = bsub.add_parser("throughput", help="forward-only images/s, params and MACs (paper Tables 3/5 columns)")
    b.add_argument("--models", default="bcssl_t,swin_t", help="comma-separated registry names (first = reference)")
    b.add_argument("--resolution", type=int, default=224, help="input side in pixels (default 224)")
    b.add_argument("--batch", type=int, default=None,
                   help="images per forward pass (default: 64 on a GPU as the paper, 16 on the CPU)")
    b.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    b.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype (default none)")
    b.add_argument("--channels-last", action="store_true", help="run in channels-last memory format")
    b.add_argument("--no-fold-bn", action="store_true", help="measure BC-SSL with its BN unfolded")
    b.add_argument("--compare-unfolded", action="store_true", help="also measure BC-SSL unfolded")
    b.add_argument("--kernel-size", type=int, default=None, help="kernel size for bcssl_*/convnext_t")
    b.add_argument("--warmup", type=int, default=None, help="untimed batches before the first round "
                   "(default 3 on a GPU, 1 on the CPU)")
    b.add_argument("--iters", type=int, default=None,
                   help="timed batches per round (default 10 on a GPU, 3 on the CPU)")
    b.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds per model; the median is reported (default 3 on a GPU, 2 on the CPU)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    _add_common(b)

    p = sub.add_parser("report", help="report.md + figures (loss/lr, k-NN monitor, results, robustness, CAM) "
                       "for one run or several side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default=None, help="output folder (default: the run itself; required for several)")
    p.add_argument("--title", default=None, help="report title (default: from the run names)")
    _add_common(p)

    p = sub.add_parser("viz", help="visualisations")
    vsub = p.add_subparsers(dest="viz_command", metavar="VIZ")
    v = vsub.add_parser("cam", help="Grad-CAM / Eigen-CAM grid (rows = runs x methods, columns = images)")
    v.add_argument("runs", nargs="+", metavar="RUN", help="run directories (one grid row per run and method)")
    v.add_argument("--images", nargs="*", default=None,
                   help="image files or a folder (default: one test image per class from the first run's data)")
    v.add_argument("--methods", default="gradcam,eigencam", help="comma-separated CAM methods (gradcam, eigencam)")
    v.add_argument("--out", default=None, help="PNG path (default: <first run>/cam.png, where `bcssl report` finds it)")
    v.add_argument("--n", type=int, default=8, help="number of default images")
    _add_common(v)
    v = vsub.add_parser("crops", help="the pre-training multi-crops of a few images: a grid PNG (original with the "
                        "boxes, then each crop as the network sees it); --json adds every crop's box",
                        description="Writes a grid PNG of the multi-crops of the first N images: one row per image, "
                        "the original with every crop's box drawn, then the crops after the whole augmentation. "
                        "Image files are cut as in pre-training (boxes over the original image, seeded as positions "
                        "0..N-1 of global step --step). With --json the last stdout line is "
                        '{"png": PATH, "images": [{"path", "width", "height", "crops": [{"kind": "global|local", '
                        '"box": [x0, y0, x1, y1], "flip": bool}]}]}, boxes in the original image pixels '
                        "(x1, y1 exclusive).")
    v.add_argument("--config", required=True, help="preset name or YAML file (its crops.* and data.*)")
    v.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. crops.n_local=10")
    v.add_argument("--images", default=None, help="a folder of images, flat or class folders (default: the "
                   "config's pre-training data)")
    v.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    v.add_argument("--step", type=int, default=0, help="global step whose crop seeds are used (default 0)")
    v.add_argument("--out", default="crops.png", help="PNG path (default: ./crops.png)")
    _add_common(v)

    p = sub.add_parser("sweep", help="kernel-size x norm study: train + evaluate every grid combination "
                       "(skips finished ones, resumes interrupted ones), then sweep report.md with tables and plots")
    p.add_argument("--config", required=True, help="preset or YAML every run starts from")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="e.g. model.kernel_size=3,5,7,9,15 model.dw_norm=ln,bn+ln (a KEY=VALUE with one value "
                        "is a fixed override, as one after the grid)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    p.add_argument("--out", default=None, help="sweep folder (default: <run.dir>/sweep_<run.name>)")
    p.add_argument("--evals", default="knn,linear,robustness",
                   help="evaluations per run (`bcssl eval --help` lists them; e.g. random_init: the k-NN of the same "
                        "network before training, and with knn the gain over it)")
    p.add_argument("--no-cam", action="store_true", help="skip the Grad-CAM grids in the summary")
    p.add_argument("--index", type=int, action="append", default=None,
                   help="run only combination I (repeatable; one job per combination, e.g. a Slurm array task)")
    p.add_argument("--train-only", action="store_true", help="train, do not evaluate (for torchrun jobs)")
    p.add_argument("--no-summary", action="store_true", help="do not write the summary after the runs")
    p.add_argument("--summarize", action="store_true", help="only write the summary of finished combinations")
    p.add_argument("--list", action="store_true", help="print the combinations with their index and status")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="slurm: write <out>/sweep.sbatch (an array job, one task per combination) instead of running")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per Slurm task (--launcher slurm)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fixed overrides for every run")
    _add_common(p)

    p = sub.add_parser("export", help="export a run's eval backbone with BN folded (safetensors, TorchScript, ONNX "
                       "or a timm ConvNeXt state dict), checked against the unfolded model")
    p.add_argument("run", help="run directory (contains config.yaml and checkpoint.pt)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "torchscript", "onnx", "timm", "hf"],
                   help="format (default safetensors; hf: a timm / Hugging Face model folder with a model card)")
    p.add_argument("--out", default=None, help="output file or folder (default: RUN/export/)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the example input used to trace and check (default: the run's crops.global_size)")
    _add_common(p)

    p = sub.add_parser("presets", help="list the built-in presets")
    _add_common(p)
    return parser


def _emit(args, result: dict, human: str) -> None:
    print(human, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)


def _relaunched(args) -> bool:
    """``--nproc N`` (N > 1) outside torchrun: the command ran again under torchrun (True)."""
    from bcssl.engine.distributed import env_world_size, relaunch_with_torchrun

    if args.nproc is None or env_world_size() > 1:
        return False
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        return False
    rc = relaunch_with_torchrun(args.nproc, _without_option(args.argv, "--nproc"))
    if rc:
        raise SystemExit(rc)
    return True


def cmd_pretrain(args) -> None:
    from bcssl.config import check_required, load_config
    from bcssl.engine.trackers import check_backends

    # what the config leaves open is found now, before torch is imported or a folder is made
    cfg = load_config(args.config, args.overrides)
    check_required(cfg)
    check_backends(cfg.log.backends)
    if args.dry_run:
        _dry_run(args, cfg)
        return
    if _relaunched(args):
        return
    from bcssl.engine.distributed import env_rank
    from bcssl.engine.trainer import train
    from bcssl.eval.knn import knn_monitor

    result = train(cfg, knn_eval=knn_monitor(cfg), resume_changed=args.resume_changed).as_dict()
    if env_rank() != 0:
        return  # rank 0 reports
    knn = f", k-NN top-1 {result['knn_top1']:.2f}%" if result["knn_top1"] is not None else ""
    if result["preempted"]:
        _emit(args, result, f"stopped by {result['preempted']} after {result['images_seen']} images; checkpoint "
                            f"saved in {result['run_dir']}; rerun the same command to resume")
        return
    _emit(args, result, f"done: {result['run_dir']} ({result['images_seen']} images, "
                        f"{result['imgs_per_s']:.0f} img/s{knn})")


def _dry_run(args, cfg) -> None:
    from bcssl.config import to_yaml
    from bcssl.engine.distributed import env_world_size
    from bcssl.engine.trainer import run_plan

    world = args.nproc or env_world_size()
    plan = run_plan(cfg, world)
    local = (f" / {plan['backbone_gmacs_local']:.3g} at {cfg.crops.local_size} px"
             if plan["backbone_gmacs_local"] is not None else "")
    lines = [to_yaml(cfg).rstrip(), "---",
             f"run folder     {plan['run_dir']} (not created)",
             f"images         {plan['images']} ({cfg.data.name}, split {cfg.data.split})",
             f"crops          {plan['crops']}",
             f"model          {cfg.model.name}: backbone {plan['backbone_params'] / 1e6:.2f} M params, "
             f"{plan['backbone_gmacs_global']:.3g} GMACs per image at {cfg.crops.global_size} px{local}; "
             f"{cfg.method.name} student {plan['student_params'] / 1e6:.2f} M trainable params",
             f"processes      {world} x batch {cfg.train.batch_size} = global batch {plan['global_batch']}",
             f"steps          {plan['steps_per_epoch']} per epoch x {plan['epochs']} epochs = {plan['total_steps']} "
             f"({plan['warmup_steps']} warm-up)",
             f"learning rate  {plan['lr']:.4g} (train.lr {cfg.train.lr:g} x {plan['global_batch']} / 256), "
             f"cosine to {plan['min_lr']:g}"]
    _emit(args, plan, "\n".join(lines))


def cmd_config_show(args) -> None:
    from omegaconf import OmegaConf

    from bcssl.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    _emit(args, {"config": OmegaConf.to_container(cfg, resolve=True)}, to_yaml(cfg).rstrip())


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def cmd_demo(args) -> None:
    from bcssl.config import ConfigError, load_config
    from bcssl.demo import process_age_s, run_demo

    started = time.perf_counter() - process_age_s()  # the interpreter start and imports count too

    overrides = list(args.overrides)
    fixed = [o for o in overrides if o.split("=", 1)[0] in ("train.epochs", "train.steps")]
    if args.budget_min is not None:
        if args.budget_min <= 0:
            raise ConfigError(f"--budget-min must be a positive number of minutes, got {args.budget_min:g}")
        if fixed:
            raise ConfigError(f"--budget-min sizes the run itself; drop {' '.join(fixed)} or --budget-min")
        overrides.append(f"demo.budget_min={args.budget_min}")
    elif fixed:  # the user chose the length: the budget does not change it
        overrides.append("demo.budget_min=null")
    cfg = load_config(args.config, overrides)
    s = run_demo(cfg, started)
    _emit(args, s, (f"k-NN top-1 on Fashion-MNIST test: pre-trained {s['knn_top1']:.2f}% | mean-centred pixels "
                    f"{s['baseline_centred_pixels_knn_top1']:.2f}% | raw pixels {s['baseline_pixels_knn_top1']:.2f}% | "
                    f"random init {s['baseline_random_knn_top1']:.2f}%\n"
                    f"{s['images_seen']:,} images ({s['epochs']:g} epochs) at {s['imgs_per_s']:.1f} img/s; whole demo "
                    f"{s['wall_s']:.0f} s on {s['machine']}; report: {s['run_dir']}/report.md"))


def cmd_eval(args) -> None:
    from bcssl.engine.distributed import env_rank
    from bcssl.eval.registry import get

    ev = get(args.eval_command)
    if ev.distributed and _relaunched(args):
        return
    options = {k: getattr(args, k) for k in getattr(args, "eval_options", [])}
    result = ev.run(args.run, args.overrides, progress=True, **options)
    if env_rank() != 0:
        return  # rank 0 reports
    if result:  # the run's experiment trackers (metrics.csv, W&B, MLflow) get the results too
        from bcssl.config import load_config
        from bcssl.engine.trackers import log_results

        log_results(load_config(str(Path(args.run) / "config.yaml"), args.overrides), args.run, ev.name, result)
    _emit(args, result, ev.summary(result, args.run))


def cmd_bench_throughput(args) -> None:
    import torch

    from bcssl.engine.runtime import resolve_device
    from bcssl.eval.throughput import benchmark, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"

    def default(value, on_gpu, on_cpu):  # the paper's GPU setting; a CPU run that ends in minutes
        return value if value is not None else (on_gpu if gpu else on_cpu)

    rows = benchmark(args.models.split(","), resolution=args.resolution, batch_size=default(args.batch, 64, 16),
                     device=device, amp=args.amp, channels_last=args.channels_last,
                     fold_bn=not args.no_fold_bn, compare_unfolded=args.compare_unfolded,
                     warmup=default(args.warmup, 3, 1), iters=default(args.iters, 10, 3),
                     repeats=default(args.repeats, 3, 2), kernel_size=args.kernel_size, progress=not args.json)
    _emit(args, {"rows": rows}, format_table(rows))


def cmd_report(args) -> None:
    from bcssl.eval.report import write_report

    path = write_report(args.runs, args.out, args.title)
    _emit(args, {"report": str(path), "run_dirs": args.runs}, f"report: {path}")


def cmd_viz_cam(args) -> None:
    from bcssl.eval.cam import cam_for_runs, default_images

    images = args.images
    if not images:
        images = default_images(args.runs[0], args.n)
    elif len(images) == 1:
        images = images[0]
    out = args.out or str(Path(args.runs[0]) / "cam.png")
    s = cam_for_runs(args.runs, images, methods=args.methods.split(","), out_png=out)
    rows = "\n".join(f"{k:40s} mean CAM area {v:.3f}" for k, v in s["cam_area_mean"].items())
    _emit(args, s, f"{rows}\nCAM grid: {s['png']}")


def cmd_viz_crops(args) -> None:
    from bcssl.config import load_config
    from bcssl.data.crop_viz import visualize_crops

    cfg = load_config(args.config, args.overrides)
    r = visualize_crops(cfg, args.images, n=args.n, step=args.step, out_png=args.out)
    _emit(args, r, f"crops of {len(r['images'])} images ({2 + cfg.crops.n_local} each): {r['png']}")


def cmd_sweep(args) -> None:
    import shlex

    from bcssl.config import ConfigError
    from bcssl.sweep import Sweep, parse_grid, split_values

    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    # --grid takes every KEY=VALUE after it: one with a single value is a fixed override, not an axis
    axes = [g for g in args.grid if len(split_values(g.partition("=")[2])) > 1]
    fixed = [g for g in args.grid if g not in axes]
    if not axes:
        raise ConfigError("--grid needs a KEY=V1,V2,... with two or more values (e.g. model.kernel_size=3,5,7,9,15)")
    args.grid, args.overrides = axes, [*fixed, *args.overrides]
    sweep = Sweep(args.config, parse_grid(args.grid), seeds, args.overrides, args.out,
                  evals=[e for e in args.evals.split(",") if e], cam=not args.no_cam)
    if args.list:
        rows = [{"index": c.index, "name": c.name, "finished": sweep.result(c) is not None,
                 "overrides": c.overrides()} for c in sweep.combinations]
        _emit(args, {"out": str(sweep.out), "combinations": rows},
              "\n".join(f"{r['index']:3d}  {'done' if r['finished'] else 'todo'}  {r['name']}" for r in rows))
        return
    if args.launcher == "slurm":
        cli = " ".join(["--config", shlex.quote(args.config), "--grid", *map(shlex.quote, args.grid),
                        *(["--seeds", args.seeds] if args.seeds else []), "--out", shlex.quote(str(sweep.out)),
                        "--evals", args.evals, *(["--no-cam"] if args.no_cam else []),
                        *map(shlex.quote, args.overrides)])
        path = sweep.slurm_script(cli, gpus=args.gpus)
        _emit(args, {"sbatch": str(path), "combinations": len(sweep.combinations)},
              f"wrote {path}; submit with: sbatch {path}  (then: bcssl sweep {cli} --summarize)")
        return
    if args.summarize:
        s = sweep.summarize()
    else:
        s = sweep.run(args.index, train_only=args.train_only, summarize=not args.no_summary)
    if "report" in s:
        _emit(args, s, f"{s['finished']}/{s['total']} combinations finished; report: {s['report']}")
    else:
        _emit(args, s, f"ran {', '.join(s['ran'])} in {s['out']}")


def cmd_export(args) -> None:
    from bcssl.export import export_run

    r = export_run(args.run, args.format, args.out, input_size=args.size).as_dict()
    _emit(args, r, f"{r['format']}: {r['path']} (max abs diff vs the unfolded backbone {r['max_abs_diff']:.2g})")


def cmd_presets(args) -> None:
    from bcssl.config import list_presets, preset_path

    rows = {}
    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        rows[name] = first
    _emit(args, {"presets": rows}, "\n".join(f"{k:28s} {v}" for k, v in rows.items()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    _Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    # argparse stops filling a positional list at the first option; KEY=VALUE overrides after an
    # option (`bcssl eval knn RUN --json eval.knn_k=10`) are taken back into the list, in order.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not (isinstance(getattr(args, "overrides", None), list)
                and all("=" in a and not a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in _GROUPS and getattr(args, f"{args.command}_command", None) is None:
        # a group without its subcommand: that group's help, which lists the subcommands
        _subparser(parser, args.command).print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="[bcssl] %(message)s")
    if not sys.stderr.isatty():  # logs and CI: a progress line every 30 s, not every 0.1 s
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    handler = {"pretrain": cmd_pretrain, "demo": cmd_demo, "presets": cmd_presets, "report": cmd_report,
               "sweep": cmd_sweep, "export": cmd_export,
               "config": {"show": cmd_config_show}.get(getattr(args, "config_command", None)),
               "viz": {"cam": cmd_viz_cam, "crops": cmd_viz_crops}.get(getattr(args, "viz_command", None)),
               "bench": {"throughput": cmd_bench_throughput}.get(getattr(args, "bench_command", None)),
               "eval": cmd_eval}[args.command]
    try:
        handler(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user; the traceback with --debug
        if args.debug or not _is_user_error(e):
            raise
        print(f"bcssl: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):  # scripts reading the last stdout line get the error there
            print(json.dumps({"error": str(e), "kind": type(e).__name__}), flush=True)
        return 1
    return 0


#: commands that only group subcommands (``dest`` of their subparsers is ``<group>_command``)
_GROUPS = ("eval", "bench", "viz", "config")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise KeyError(name)


def _is_user_error(e: Exception) -> bool:
    from bcssl.config import ConfigError

    kinds = [ConfigError, FileNotFoundError, ValueError]
    # the engine's errors, when their modules were imported at all (if not, e cannot be one of them,
    # and a config error stays fast: no torch import just to classify it)
    for module, name in (("bcssl.engine.checkpoint", "CheckpointError"), ("bcssl.engine.runtime", "TrainingError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(e, tuple(kinds))


if __name__ == "__main__":
    sys.exit(main())
