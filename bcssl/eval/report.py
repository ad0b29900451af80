"""``bcssl report``: one markdown report + PNG figures from one or several run directories.

Everything is read from what the run directory already holds (no model is loaded, nothing is
evaluated here): ``config.yaml``, ``metrics.jsonl``, ``demo.json`` and, where present, the
``<name>.json`` of every registered evaluation (:mod:`bcssl.eval.registry`: ``knn.json``,
``linear.json``, ``robustness.json``, ... each adds its columns and section). A missing piece is skipped, so a run that has logged only a few training steps
still gets a report. Figures are drawn with matplotlib's Agg canvas (no display, no pyplot
global state):

* ``figures/loss.png``: training loss, lr (+ weight decay), and the DINO teacher entropy
  (normalised by log K, so 1.0 = uniform output = collapse) against the epoch, one colour per run;
* ``figures/knn.png``: the k-NN monitor, top-1 against the epoch, one curve per run (the paper's
  Figure 3 style); the demo's baselines (raw pixels, random initialisation) as flat lines.

Usage::

    from bcssl.eval.report import write_report
    write_report(["runs/demo"])                                    # -> runs/demo/report.md
    write_report(["runs/k3", "runs/k9", "runs/k13"], "reports/kernels", title="Kernel size")
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

DPI = 110
REPORT_NAME = "report.md"
FIGURE_DIR = "figures"
UNIFORM_ENTROPY = 1.0  # teacher entropy is logged normalised by log(out_dim): 1.0 = uniform = collapse

_FOLDER_BENCHMARKS = ("ImageNet-A", "ImageNet-R", "ImageNet-Sketch")


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunData:
    """What one run directory holds, read leniently (absent files are ``None``/empty).

    ``results``: ``{name: <run>/<name>.json}`` of every registered evaluation that ran
    (:mod:`bcssl.eval.registry`); ``knn``, ``linear``, ... are shortcuts to them."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    results: dict = field(default_factory=dict)
    demo: dict | None = None
    cam_png: Path | None = None
    notes: list = field(default_factory=list)  # things that could not be read, odd records
    label: str = ""  # legend label, set by :func:`load_runs` (unique across the report)

    @property
    def knn(self) -> dict | None:
        return self.results.get("knn")

    @property
    def linear(self) -> dict | None:
        return self.results.get("linear")

    @property
    def robustness(self) -> dict | None:
        return self.results.get("robustness")

    @property
    def detection(self) -> dict | None:
        return self.results.get("detection")

    @property
    def cam(self) -> dict | None:
        return self.results.get("cam")

    @property
    def throughput(self) -> list | None:
        tp = self.results.get("throughput")
        rows = tp.get("rows") if isinstance(tp, dict) else tp
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def records(self, kind: str) -> list[dict]:
        return [r for r in self.metrics if r.get("kind") == kind]


def _num(v: Any) -> float | None:
    """A finite-or-infinite float from a metrics value (``None`` for NaN/absent/non-numbers).

    ``MetricsLog`` writes NaN as ``null`` and +-inf as the strings ``"inf"``/``"-inf"``."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return None if math.isnan(v) else float(v)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return None if math.isnan(f) else f
    return None


def _read_json(path: Path, notes: list) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"`{path.name}` could not be read ({type(e).__name__}: {e}); skipped")
        return None


def _read_metrics(path: Path, notes: list) -> list[dict]:
    """``metrics.jsonl``, line by line: a truncated last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        notes.append("no `metrics.jsonl` (no training curves)")
        return []
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{bad} unreadable line(s) in `metrics.jsonl` skipped")
    return out


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read one run directory. ``FileNotFoundError`` (naming it) when it is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a bcssl run directory (it does not exist)")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a bcssl run directory (no config.yaml); "
                                "create one with `bcssl pretrain`")
    notes: list[str] = []
    config: dict = {}
    try:  # read as plain YAML, not validated: a report of an older run must still work
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
        config = loaded if isinstance(loaded, dict) else {}
    except Exception as e:  # noqa: BLE001 - any YAML problem: report what we can
        notes.append(f"`config.yaml` could not be read ({type(e).__name__}: {e})")
    run = RunData(path=path, name=path.name, config=config, notes=notes)
    run.name = str(run.cfg("run.name") or path.resolve().name)
    run.metrics = _read_metrics(path / "metrics.jsonl", notes)
    from bcssl.eval.registry import names

    for name in [*names(), "demo"]:
        fname = f"{name}.json"
        value = _read_json(path / fname, notes)
        if name == "throughput" and isinstance(value, list):  # older throughput.json: the rows alone
            value = {"rows": value}
        if value is not None and not isinstance(value, dict):
            notes.append(f"`{fname}` is not a JSON object; skipped")
            value = None
        if name == "demo":
            run.demo = value
        elif value is not None:
            run.results[name] = value
    run.cam_png = path / "cam.png" if (path / "cam.png").is_file() else None
    return run


def _fmt_kernel(k: Any) -> str:
    if isinstance(k, (list, tuple)):
        return "/".join(str(x) for x in k)
    return "-" if k is None else str(k)


def _set_labels(runs: Sequence[RunData]) -> None:
    """Legend labels: run name + model + kernel size (+ dw_norm / method where runs differ);
    unique across the report (a repeated name gets its parent directory)."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    varies = {key: len({str(r.cfg(key)) for r in runs}) > 1 for key in ("model.dw_norm", "method.name")}
    for r in runs:
        parts = [str(r.cfg("model.name", "?"))]
        if r.cfg("model.kernel_size") is not None:
            parts.append(f"k={_fmt_kernel(r.cfg('model.kernel_size'))}")
        if varies["model.dw_norm"] and r.cfg("model.dw_norm") is not None:
            parts.append(str(r.cfg("model.dw_norm")))
        if varies["method.name"] and r.cfg("method.name") is not None:
            parts.append(str(r.cfg("method.name")))
        r.label = f"{r.name} ({', '.join(parts)})"


def load_runs(run_dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[RunData]:
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    _set_labels(runs)
    return runs


# ----------------------------------------------------------------------------- series


def _series(run: RunData, kind: str, key: str) -> tuple[list[float], list[float], str]:
    """(x, y, x_name) of ``key`` in ``kind`` records, in step order; x is the epoch (the step
    when no record has one); records whose value is not a finite/infinite number are dropped."""
    recs = sorted(run.records(kind), key=lambda r: (_num(r.get("step")) or 0))
    use_epoch = any(_num(r.get("epoch")) is not None for r in recs)
    xs, ys = [], []
    for r in recs:
        x = _num(r.get("epoch") if use_epoch else r.get("step"))
        y = _num(r.get(key))
        if x is None or y is None or math.isinf(y):
            continue
        xs.append(x)
        ys.append(y)
    return xs, ys, "epoch" if use_epoch else "step"


def knn_series(runs: Sequence[RunData]) -> list[dict]:
    """The k-NN monitor curves: ``[{"label", "epoch": [...], "top1": [...]}]``, one per run that
    has ``knn`` records (what ``figures/knn.png`` plots)."""
    out = []
    for r in runs:
        xs, ys, _ = _series(r, "knn", "top1")
        if xs:
            out.append({"label": r.label, "run": r.name, "epoch": xs, "top1": ys})
    return out


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------- figures


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_loss(runs: Sequence[RunData], path: str | os.PathLike) -> list[str] | None:
    """``figures/loss.png``: loss / lr (+wd) / teacher entropy (when logged) against the epoch.
    Returns the legend labels (one per run with training records), or ``None`` (nothing drawn)."""
    colors = _colors(len(runs))
    drawn = [(r, c) for r, c in zip(runs, colors) if _series(r, "train", "loss")[0]]
    if not drawn:
        return None
    has_entropy = any(_series(r, "train", "teacher_entropy")[0] for r, _ in drawn)
    n_panels = 3 if has_entropy else 2
    fig = _new_figure(7.5, 2.5 + 2.2 * n_panels)
    axes = fig.subplots(n_panels, 1, sharex=True, gridspec_kw={"height_ratios": [1.6, 1, 1][:n_panels]})
    ax_loss, ax_lr = axes[0], axes[1]
    ax_wd = None
    xname = "epoch"
    wd_values = {round(v, 12) for r, _ in drawn for v in _series(r, "train", "wd")[1]}
    wd_varies = len(wd_values) > 1  # a constant weight decay goes into the title, not on an axis
    for r, c in drawn:
        xs, ys, xname = _series(r, "train", "loss")
        if len(xs) > 200:  # long runs: the raw curve faint, a running mean on top
            ax_loss.plot(xs, ys, color=c, alpha=0.25, lw=0.7)
            ax_loss.plot(xs, _smooth(ys, max(2, len(ys) // 50)), color=c, lw=1.6, label=r.label)
        else:
            ax_loss.plot(xs, ys, color=c, lw=1.4, marker="." if len(xs) < 30 else None, label=r.label)
        nf = [(_num(n.get("epoch")), _num(n.get("step"))) for n in r.records("nonfinite")]
        nf_x = [e if xname == "epoch" else s for e, s in nf]
        nf_x = [x for x in nf_x if x is not None]
        if nf_x:
            ax_loss.plot(nf_x, [0.02] * len(nf_x), "x", color=c, ms=6, transform=ax_loss.get_xaxis_transform(),
                         clip_on=False)
        lx, ly, _ = _series(r, "train", "lr")
        if lx:
            ax_lr.plot(lx, ly, color=c, lw=1.4)
        wx, wy, _ = _series(r, "train", "wd")
        if wx and wd_varies:
            if ax_wd is None:
                ax_wd = ax_lr.twinx()
            ax_wd.plot(wx, wy, color=c, lw=1.2, ls="--")
        if has_entropy:
            ex, ey, _ = _series(r, "train", "teacher_entropy")
            if ex:
                axes[2].plot(ex, ey, color=c, lw=1.4)
            bx, by, _ = _series(r, "train", "teacher_batch_entropy")
            if bx:
                axes[2].plot(bx, by, color=c, lw=1.0, ls=":")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss" + (" (x: non-finite step)" if any(r.records("nonfinite") for r, _ in drawn)
                                         else ""), fontsize=10)
    ax_loss.legend(fontsize=8, loc="best", framealpha=0.85)
    ax_lr.set_ylabel("learning rate" + (" (solid)" if ax_wd is not None else ""))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.set_title("Schedules" + (f" (weight decay {next(iter(wd_values)):g}, constant)" if len(wd_values) == 1
                                   else ""), fontsize=10)
    if ax_wd is not None:
        ax_wd.set_ylabel("weight decay (dashed)")
    if has_entropy:
        ax_e = axes[2]
        ax_e.axhline(UNIFORM_ENTROPY, color="0.3", ls="--", lw=1.0)
        ax_e.text(0.005, UNIFORM_ENTROPY, " uniform (collapse)", transform=ax_e.get_yaxis_transform(),
                  va="bottom", ha="left", fontsize=7, color="0.3")
        ax_e.set_ylim(0, 1.12)
        ax_e.set_ylabel("entropy / log K")
        ax_e.set_title("Teacher entropy: per sample (solid), of the batch mean (dotted)", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(xname)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return [r.label for r, _ in drawn]


def plot_knn(runs: Sequence[RunData], path: str | os.PathLike) -> list[str] | None:
    """``figures/knn.png``: k-NN monitor top-1 against the epoch, one curve per run (Figure 3
    style). Returns the labels of the run curves in the legend, or ``None`` (no ``knn`` records)."""
    from matplotlib.ticker import MaxNLocator

    series = knn_series(runs)
    if not series:
        return None
    color_of = dict(zip((r.label for r in runs), _colors(len(runs))))
    fig = _new_figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    curves = []
    for s in series:
        (line,) = ax.plot(s["epoch"], s["top1"], color=color_of[s["label"]], marker="o", ms=4, lw=1.6,
                          label=s["label"])
        curves.append(line)
    # The demo's baselines, measured in the same run on the monitor's own bank and queries (its
    # `monitor_baselines`; the full sets when the monitor reads them all), so each curve is drawn
    # against pixels and random init of the same images. The full-set result is in the tables.
    extra = []
    for r in runs:
        if not r.demo:
            continue
        mon = r.demo.get("monitor_baselines") or {}
        if not mon and any((r.cfg("eval.knn_train_limit"), r.cfg("eval.knn_test_limit"))):
            continue  # full-set baselines under a subset's curve would compare unlike with unlike
        prefix = f"{r.name}: " if len(runs) > 1 else ""
        lines = [("centred_pixels_knn_top1", "baseline_centred_pixels_knn_top1", "mean-centred pixels", "--"),
                 ("pixels_knn_top1", "baseline_pixels_knn_top1", "raw pixels", "-."),
                 ("random_knn_top1", "baseline_random_knn_top1", "random init", ":")]
        for key, full_key, name, style in lines:
            v = _num(mon.get(key)) if mon else _num(r.demo.get(full_key))
            if v is not None:
                extra.append(ax.axhline(v, color=color_of[r.label], ls=style, lw=1.1, alpha=0.8,
                                        label=prefix + name))
    limits = {(r.cfg("eval.knn_train_limit"), r.cfg("eval.knn_test_limit")) for r in runs}
    subset = next((lim for lim in limits if any(lim)), None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("k-NN monitor during pre-training" + (
        f" (monitor bank: first {subset[0] or 'all'} train / {subset[1] or 'all'} test images)" if subset else ""),
        fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    xs = [x for s in series for x in s["epoch"]]
    if min(xs) == max(xs):  # a single evaluation: give the point some room
        ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    return [lab for lab in labels if lab in {c.get_label() for c in curves}]


# ----------------------------------------------------------------------------- numbers


def _final_knn(run: RunData) -> tuple[float | None, float | None, str | None]:
    if run.knn and _num(run.knn.get("knn_top1")) is not None:
        k = run.knn.get("k")
        return (_num(run.knn.get("knn_top1")), _num(run.knn.get("knn_top5")),
                "`knn.json`" + (f" (k={k})" if k is not None else ""))
    if run.demo and _num(run.demo.get("knn_top1")) is not None:
        return _num(run.demo.get("knn_top1")), _num(run.demo.get("knn_top5")), "`demo.json` (full sets)"
    recs = [r for r in run.records("knn") if _num(r.get("top1")) is not None]
    if recs:
        last = max(recs, key=lambda r: _num(r.get("step")) or 0)
        return (_num(last.get("top1")), _num(last.get("top5")),
                f"last k-NN monitor record (epoch {last.get('epoch', '?')})")
    return None, None, None


def _final_linear(run: RunData) -> tuple[float | None, float | None, str | None]:
    if run.linear and _num(run.linear.get("linear_top1")) is not None:
        ep = run.linear.get("epochs")
        return (_num(run.linear.get("linear_top1")), _num(run.linear.get("linear_top5")),
                "`linear.json`" + (f" ({ep} epochs)" if ep is not None else ""))
    recs = [r for r in run.records("linear") if _num(r.get("top1")) is not None]
    if recs:
        last = max(recs, key=lambda r: _num(r.get("step")) or 0)
        return _num(last.get("top1")), _num(last.get("top5")), "last `linear` record in `metrics.jsonl`"
    return None, None, None


def _robustness_rows(run: RunData) -> list[dict]:
    if not run.robustness:
        return []
    from bcssl.eval.robustness import robustness_report_rows

    try:
        return robustness_report_rows(run.robustness)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        run.notes.append(f"`robustness.json` has an unexpected layout ({type(e).__name__}: {e}); skipped")
        run.results.pop("robustness", None)
        return []


def _robustness_summary(rows: list[dict]) -> dict[str, dict]:
    """benchmark -> {"error", "ce"} (corruption tables: the mean row) or {"top1", "error"} (A/R/Sketch)."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["name"] in ("mean", "all"):
            out[row["benchmark"]] = row
    return out


def _epochs_trained(run: RunData) -> float | None:
    xs, _, xname = _series(run, "train", "loss")
    if xname == "epoch" and xs:
        return max(xs)
    return None


def _imgs_per_s(run: RunData) -> float | None:
    if run.demo and _num(run.demo.get("imgs_per_s")) is not None:
        return _num(run.demo.get("imgs_per_s"))
    vals = [_num(r.get("imgs_per_s")) for r in run.records("train")]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _f(v: Any, nd: int = 2) -> str:
    v = _num(v)
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{nd}f}"


def _int(v: Any) -> str:
    v = _num(v)
    return "-" if v is None else f"{int(round(v)):,}"


def _esc(s: Any) -> str:
    return str(s).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
    return out


def _drop_empty_columns(header: list[str], rows: list[list[str]], keep: int = 1):
    """Drop the columns (after the first ``keep``) that are ``-`` in every row."""
    cols = [i for i in range(len(header)) if i < keep or any(row[i] != "-" for row in rows)]
    return [header[i] for i in cols], [[row[i] for i in cols] for row in rows]


def results_rows(runs: Sequence[RunData]) -> tuple[list[str], list[list[str]]]:
    """The results table (header, rows): one row per run, the columns of every registered
    evaluation (:meth:`~bcssl.eval.registry.Evaluation.report_columns`, in registry order) between
    the run's description and the demo's numbers; columns nobody has are dropped."""
    from bcssl.eval.registry import all_evaluations

    evaluations = all_evaluations()
    cells = [dict(c for ev in evaluations for c in ev.report_columns(r)) for r in runs]
    eval_header = list(dict.fromkeys(h for ev in evaluations for r in runs for h, _ in ev.report_columns(r)))
    header = ["run", "model", "kernel", "epochs", *eval_header,
              "k-NN raw pixels", "k-NN random init", "images seen", "img/s (train)"]
    rows = []
    for r, c in zip(runs, cells):
        ep = _epochs_trained(r)
        planned = r.cfg("train.epochs")
        if r.demo and r.demo.get("epochs") is not None:
            epochs = str(r.demo["epochs"])
        elif ep is not None:
            epochs = f"{ep:.2f}".rstrip("0").rstrip(".") + (f" / {planned}" if planned is not None else "")
        else:
            epochs = "-" if planned is None else f"0 / {planned}"
        row = [r.name, str(r.cfg("model.name", "-")), _fmt_kernel(r.cfg("model.kernel_size")), epochs,
               *[c.get(h, "-") for h in eval_header]]
        d = r.demo or {}
        row += [_f(d.get("baseline_pixels_knn_top1")), _f(d.get("baseline_random_knn_top1")),
                _int(d.get("images_seen")), _f(_imgs_per_s(r), 1)]
        rows.append(row)
    return _drop_empty_columns(header, rows, keep=4)


# ----------------------------------------------------------------------------- report sections


def _results_section(runs: Sequence[RunData]) -> list[str]:
    header, rows = results_rows(runs)
    lines = ["## Results", "",
             "Accuracies and errors in %; mCE relative to AlexNet (ImageNet-C only); epochs: trained / "
             "planned (from the training log; the demo's own count when `demo.json` exists); img/s: "
             "the demo's training average, else the median of the logged training throughput.", ""]
    lines += _table(header, rows)
    from bcssl.eval.registry import all_evaluations

    sources = []
    for r in runs:
        src = [line for ev in all_evaluations() for line in ev.report_sources(r)]
        if src:
            sources.append(f"- {r.name}: " + "; ".join(src))
    if sources:
        lines += ["", *sources]
    return lines + [""]


def _demo_section(runs: Sequence[RunData]) -> list[str]:
    demo_runs = [r for r in runs if r.demo]
    if not demo_runs:
        return []
    lines = ["## Demo: k-NN against baselines measured in the same run", ""]
    rows = []
    for r in demo_runs:
        d = r.demo
        model = r.cfg("model.name", "network")
        mon = d.get("monitor_baselines") or {}

        def row(name, full_key, mon_key):
            return [r.name, name, _f(d.get(full_key))] + ([_f(mon.get(mon_key))] if mon else [])
        rows += [row("raw pixels", "baseline_pixels_knn_top1", "pixels_knn_top1"),
                 row("mean-centred pixels", "baseline_centred_pixels_knn_top1", "centred_pixels_knn_top1"),
                 row(f"{model}, random initialisation", "baseline_random_knn_top1", "random_knn_top1"),
                 row(f"{model}, pre-trained ({d.get('epochs', '?')} epochs)", "knn_top1", "pretrained_knn_top1")]
    mons = [r.demo.get("monitor_baselines") for r in demo_runs if r.demo.get("monitor_baselines")]
    header = ["run", "features", "k-NN top-1 (%), full sets"]
    if mons and len(mons) == len(demo_runs):
        header.append(f"monitor bank ({_int(mons[0].get('bank'))} / {_int(mons[0].get('queries'))})")
    else:
        rows = [cells[:3] for cells in rows]
    lines += _table(header, rows)
    lines.append("")
    for r in demo_runs:
        d = r.demo
        lines.append(f"- {r.name}: {_int(d.get('images_seen'))} images in {_f(d.get('train_s'), 0)} s "
                     f"({_f(d.get('imgs_per_s'), 0)} img/s); whole demo {_f(d.get('wall_s'), 0)} s"
                     + (f" on {d['machine']}" if d.get("machine") else "") + ".")
        b = d.get("budget")
        if b:
            lines.append(f"  Budget {_f(b.get('budget_min'), 0)} min: the speed probe measured "
                         f"{_f(b.get('probe_imgs_per_s'), 1)} img/s, so the run was sized to {_int(b.get('steps'))} "
                         f"steps ({_f(b.get('epochs'), 2)} epochs).")
    return lines + [""]


def _robustness_section(runs: Sequence[RunData]) -> list[str]:
    per_run = [(r, _robustness_rows(r)) for r in runs]
    per_run = [(r, rows) for r, rows in per_run if rows]
    if not per_run:
        return []
    lines = ["## Robustness (Table 5 style)", ""]
    benches = list(dict.fromkeys(row["benchmark"] for _, rows in per_run for row in rows))
    header, table = ["run"], []
    for b in benches:
        header += [f"{b} top-1", f"{b} mCE"] if b in _FOLDER_BENCHMARKS else [f"{b} mean err", f"{b} mCE"]
    for r, rows in per_run:
        s = _robustness_summary(rows)
        row = [r.label]
        for b in benches:
            m = s.get(b, {})
            row += [_f(m.get("top1")), "-"] if b in _FOLDER_BENCHMARKS else [_f(m.get("error")), _f(m.get("ce"))]
        table.append(row)
    header, table = _drop_empty_columns(header, table)
    lines += ["Errors / top-1 in %; mCE: mean corruption error relative to AlexNet (ImageNet-C only); "
              "lower error and mCE are better, higher ImageNet-A/-R/-Sketch top-1 is better.", ""]
    lines += _table(header, table) + [""]
    from bcssl.eval.robustness import _BENCHMARK_NAMES

    for r, _ in per_run:  # how many images each number rests on, and whether a subset
        results = r.robustness.values() if "benchmark" not in r.robustness else [r.robustness]
        sizes = [f"{_BENCHMARK_NAMES.get(v.get('benchmark'), v.get('benchmark'))}: {_int(v.get('n_images'))} images"
                 + (f" ({v['images']})" if v.get("images") else "") for v in results if isinstance(v, dict)]
        if sizes:
            lines.append(f"- {r.name}: " + "; ".join(sizes))
    lines.append("")
    for r, rows in per_run:
        corr = [row for row in rows if row["benchmark"] not in _FOLDER_BENCHMARKS]
        if not corr:
            continue
        sevs = [k for k in ("sev_1", "sev_2", "sev_3", "sev_4", "sev_5") if any(row.get(k) is not None for row in corr)]
        header = ["benchmark", "corruption", "error", "CE", *[f"s{k[-1]}" for k in sevs]]
        t = [[row["benchmark"], row["name"], _f(row.get("error")), _f(row.get("ce")),
              *[_f(row.get(k)) for k in sevs]] for row in corr]
        header, t = _drop_empty_columns(header, t, keep=3)
        lines += [f"### {r.name}: error by corruption and severity", ""] + _table(header, t) + [""]
    return lines


def _throughput_section(runs: Sequence[RunData]) -> list[str]:
    seen, rows = set(), []
    for r in runs:
        for row in r.throughput or []:
            key = json.dumps(row, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    if not rows:
        return []
    try:
        from bcssl.eval.throughput import format_table

        table = format_table(rows).rstrip("\n").splitlines()
    except Exception:  # noqa: BLE001 - rows missing a field format_table needs: a plain table
        keys = [k for k in ("model", "kernel_size", "params_m", "gmacs", "img_per_s", "device")
                if any(k in r for r in rows)]
        table = _table(keys, [[_f(r.get(k)) if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys]
                              for r in rows])
    return ["## Throughput", "", "Inference images/s (median of interleaved repeats), from `throughput.json`.", "",
            *table, ""]


def _cam_section(runs: Sequence[RunData], out_dir: Path, fig_dir: Path) -> list[str]:
    cams = [r for r in runs if r.cam_png is not None]
    if not cams:
        return []
    lines = ["## Class activation maps", ""]
    for r in cams:
        if r.cam_png.parent.resolve() == out_dir.resolve():
            rel = r.cam_png.name
        else:
            fig_dir.mkdir(parents=True, exist_ok=True)
            dest = fig_dir / (f"cam_{_safe(r.name)}.png" if len(runs) > 1 else "cam.png")
            shutil.copyfile(r.cam_png, dest)
            rel = dest.relative_to(out_dir).as_posix()
        if len(runs) > 1:
            lines += [f"### {r.label}", ""]
        lines.append(f"![CAM {r.name}]({rel})")
        if r.cam:
            info = [f"{k}: {v}" for k, v in r.cam.items()
                    if isinstance(v, (str, int, float, bool)) and k not in ("run_dir", "path", "png", "json")]
            if info:
                lines += ["", "*" + "; ".join(_esc(i) for i in info[:8]) + "*"]
        if r.cam and isinstance(r.cam.get("cam_area_mean"), dict):
            thr = r.cam.get("area_threshold", 0.5)
            lines += ["", f"| row | mean CAM area (fraction of the image above {thr}) |", "|---|---|"]
            lines += [f"| {_esc(str(k))} | {v:.3f} |" for k, v in r.cam["cam_area_mean"].items()]
        lines.append("")
    return lines


def _config_section(runs: Sequence[RunData], out_dir: Path) -> list[str]:
    keys = [("model", "model.name"), ("kernel", "model.kernel_size"), ("dw_norm", "model.dw_norm"),
            ("stem stride", "model.stem_stride"), ("method", "method.name"), ("data", "data.name"),
            ("epochs", "train.epochs"), ("batch", "train.batch_size"), ("lr", "train.lr"),
            ("crops", None), ("config", None)]
    rows = []
    for r in runs:
        row = [r.name]
        for label, key in keys:
            if key is not None:
                v = r.cfg(key)
                row.append(_fmt_kernel(v) if label == "kernel" else ("-" if v is None else str(v)))
            elif label == "crops":
                g, loc, n = r.cfg("crops.global_size"), r.cfg("crops.local_size"), r.cfg("crops.n_local")
                row.append("-" if g is None else f"2x{g}" + (f" + {n}x{loc}" if n else ""))
            else:
                row.append(f"[config.yaml]({_rel(r.path / 'config.yaml', out_dir)})")
        rows.append(row)
    header, rows = _drop_empty_columns(["run", *[k for k, _ in keys]], rows)
    return ["## Configuration", "", *_table(header, rows), ""]


def _notes_section(runs: Sequence[RunData]) -> list[str]:
    lines = []
    for r in runs:
        notes = list(r.notes)
        nf = r.records("nonfinite")
        if nf:
            notes.append(f"{len(nf)} non-finite loss step(s) skipped by the trainer (marked x on the loss plot)")
        skipped = sum(_num(d.get("skipped_images")) or 0 for d in r.records("data"))
        if skipped:
            notes.append(f"{int(skipped)} unreadable training image(s) skipped by the loader")
        if not r.records("train"):
            notes.append("no training records yet")
        ep = [_num(t.get("epoch")) for t in sorted(r.records("train"), key=lambda t: _num(t.get("step")) or 0)]
        ep = [e for e in ep if e is not None]
        if any(b < a for a, b in zip(ep, ep[1:])):
            notes.append("the `epoch` of training records goes backwards with the step (a log from "
                         "an older or interrupted run?); curves are drawn in step order")
        lines += [f"- {r.name}: {n}" for n in notes]
    return ["## Notes", "", *lines, ""] if lines else []


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _rel(p: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(p.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return p.resolve().as_posix()


# ----------------------------------------------------------------------------- entry point


def write_report(run_dirs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                 title: str | None = None) -> Path:
    """Write ``report.md`` + ``figures/*.png`` for one or several runs; returns the report's path.

    ``out_dir`` defaults to the run directory for one run and is required for several.
    A directory that is not a run raises ``FileNotFoundError`` naming it.
    """
    runs = load_runs(run_dirs)
    if out_dir is None:
        if len(runs) > 1:
            raise ValueError(f"a report of {len(runs)} runs needs an output directory (out_dir)")
        out_dir = runs[0].path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / FIGURE_DIR
    fig_dir.mkdir(exist_ok=True)
    for stale in ("loss.png", "knn.png"):  # a figure this report does not draw must not linger
        (fig_dir / stale).unlink(missing_ok=True)

    if title is None:
        title = (f"bcssl report: {runs[0].name}" if len(runs) == 1
                 else f"bcssl report: {len(runs)} runs")
    lines = [f"# {title}", ""]
    lines += ["Runs: " + ", ".join(f"[{r.name}]({_rel(r.path, out)})" for r in runs)
              + " (curves from `metrics.jsonl`).", ""]
    lines += _results_section(runs)
    lines += _demo_section(runs)

    knn_labels = plot_knn(runs, fig_dir / "knn.png")
    if knn_labels:
        lines += ["## k-NN monitor", "", f"![k-NN top-1 against the epoch]({FIGURE_DIR}/knn.png)", ""]
    loss_labels = plot_loss(runs, fig_dir / "loss.png")
    if loss_labels:
        lines += ["## Training curves", "",
                  f"![training loss, schedules, teacher entropy]({FIGURE_DIR}/loss.png)", ""]
        if any(_series(r, "train", "teacher_entropy")[0] for r in runs):
            lines += ["Teacher entropy is normalised by log K (K = head output dim). Per-sample entropy "
                      "near 1.0 (dashed line): the teacher output is uniform (collapse by flattening). "
                      "Batch-mean entropy near 0: every image gets the same prototype (collapse by one "
                      "dimension dominating). Healthy: per-sample low, batch-mean high.", ""]
    from bcssl.eval.registry import all_evaluations

    for ev in all_evaluations():
        lines += ev.report_section(runs, out, fig_dir)
    lines += _config_section(runs, out)
    lines += _notes_section(runs)

    path = out / REPORT_NAME
    tmp = out / f".{REPORT_NAME}.tmp.{os.getpid()}"
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["RunData", "knn_series", "load_run", "load_runs", "plot_knn", "plot_loss", "results_rows",
           "write_report"]
