"""The summary of a ``bcssl sweep``: Table 2-style accuracy tables (rows = dw_norm, columns =
kernel size, mean +- std over seeds), the Figure 2-style plot (k-NN vs kernel size, one line per
norm), a Table 5-style robustness table, and CAM grids (one row per kernel size) with the
Table 6-style mean CAM area, written to ``<out>/report.md`` with PNGs and ``summary.json``."""
from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from bcssl.engine.run_dir import write_json
from bcssl.eval.report import _f, _table

if TYPE_CHECKING:
    from bcssl.sweep import Sweep

log = logging.getLogger("bcssl")

def sweep_metrics() -> dict[str, tuple[str, bool]]:
    """Key in sweep_result.json -> (table title, higher is better): every registered evaluation's
    ``sweep_metrics`` and the training throughput."""
    from bcssl.eval.registry import all_evaluations

    out = {k: v for ev in all_evaluations() for k, v in ev.sweep_metrics.items()}
    out["imgs_per_s"] = ("training images/s", True)
    return out


def _sort_key(v: str):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_cell(values: list[float], nd: int = 2) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{nd}f}" + (f" ± {s:.{nd}f}" if s is not None else "")


class Pivot:
    """Results grouped by (row label, column value); a cell holds one value per seed."""

    def __init__(self, sweep: "Sweep", results: dict[str, dict | None]):
        self.col_key, self.row_keys = sweep.col_key, sweep.row_keys
        self.cols = sorted(sweep.grid[self.col_key], key=_sort_key)
        self.rows: list[str] = []
        self.cells: dict[tuple[str, str], list[dict]] = {}
        for combo in sweep.combinations:
            a = dict(combo.assignments)
            row = self.row_label(a)
            if row not in self.rows:
                self.rows.append(row)
            r = results.get(combo.name)
            if r is not None:
                self.cells.setdefault((row, a[self.col_key]), []).append(r)

    def row_label(self, assignments: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]}={assignments[k]}" for k in self.row_keys) or "all"

    def values(self, row: str, col: str, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.cells.get((row, col), []) if r.get(metric) is not None]

    def has(self, metric: str) -> bool:
        return any(self.values(r, c, metric) for r in self.rows for c in self.cols)

    @property
    def col_labels(self) -> list[str]:
        return [f"{self.col_key.split('.')[-1]}={c}" for c in self.cols]

    def table(self, metric: str, nd: int = 2) -> list[str]:
        head = [", ".join(k.split(".")[-1] for k in self.row_keys), *self.col_labels]
        return _table(head, [[row, *[fmt_cell(self.values(row, c, metric), nd) for c in self.cols]]
                             for row in self.rows])


def plot_vs_column(pivot: Pivot, metrics: list[str], path: Path) -> Path | None:
    """Figure 2 style: one panel per metric, x = column value (kernel size), one line per row."""
    metrics = [m for m in metrics if pivot.has(m)]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(_sort_key(c)[0] == 0 for c in pivot.cols)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for row in pivot.rows:
            xs, ys, es = [], [], []
            for i, c in enumerate(pivot.cols):
                v = pivot.values(row, c, metric)
                if v:
                    m, s = mean_std(v)
                    xs.append(float(c) if numeric else i)
                    ys.append(m)
                    es.append(s or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", capsize=3, label=row)
        ax.set_xlabel(pivot.col_key.split(".")[-1])
        ax.set_ylabel(sweep_metrics().get(metric, (metric,))[0])
        if numeric:
            ax.set_xticks([float(c) for c in pivot.cols])
            ax.set_xticklabels(pivot.cols)
        else:
            ax.set_xticks(range(len(pivot.cols)))
            ax.set_xticklabels(pivot.cols)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cam_grids(sweep: "Sweep", pivot: Pivot, results: dict[str, dict | None], fig_dir: Path,
              n_images: int = 8) -> dict[str, dict]:
    """One Grad-CAM grid per row (norm): one grid row per kernel size, first seed, same images.
    Returns ``{row: {"png", "area": {col: mean CAM area}}}``."""
    from bcssl.eval.cam import cam_for_runs, default_images

    first_seed = sweep.seeds[0]
    out: dict[str, dict] = {}
    images = None
    for row in pivot.rows:
        runs, cols = [], []
        for c in pivot.cols:
            for combo in sweep.combinations:
                a = dict(combo.assignments)
                if combo.seed == first_seed and a[pivot.col_key] == c and pivot.row_label(a) == row \
                        and results.get(combo.name) is not None:
                    runs.append(sweep.run_dir(combo))
                    cols.append(c)
        if not runs:
            continue
        if images is None:
            images = default_images(runs[0], n_images)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in row)
        s = cam_for_runs(runs, images, methods=["gradcam"], out_png=fig_dir / f"cam_{safe}.png",
                         title=f"Grad-CAM, {row} (rows: {pivot.col_key.split('.')[-1]})")
        out[row] = {"png": s["png"], "area": {c: r["cam_area_mean"] for c, r in zip(cols, s["rows"])}}
    return out


def write_sweep_report(sweep: "Sweep", results: dict[str, dict | None]) -> dict:
    out_dir = sweep.out
    fig_dir = out_dir / "figures"
    pivot = Pivot(sweep, results)
    done = [n for n, r in results.items() if r is not None]
    missing = [n for n, r in results.items() if r is None]

    md = [f"# Sweep: {sweep.config}", "",
          "Grid: " + ", ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in sweep.grid.items()) + "; "
          f"seeds {sweep.seeds}; fixed overrides: {' '.join(sweep.overrides) or 'none'}.",
          f"{len(done)} of {len(results)} combinations finished." + (
              f" Not finished yet: {', '.join(missing)}." if missing else ""), "",
          "Cells: mean ± sample std over seeds (a single seed shows the value alone).", ""]
    special = {"knn_top1": "k-NN top-1 (%) — Table 2 style",
               "random_knn_top1": "k-NN top-1 (%) of the same network at random initialisation",
               "knn_gain_over_random": "k-NN gain of pre-training over random initialisation (points)",
               "imgs_per_s": "Pre-training throughput (images/s, this machine)"}
    robustness = ("clean_error", "corruption_error")  # their own section below
    sections = [(m, special.get(m, title[0].upper() + title[1:]), 0 if m == "imgs_per_s" else 2)
                for m, (title, _) in sweep_metrics().items() if m not in robustness]
    protocols = sorted({r.get("linear_protocol") for r in results.values() if r and r.get("linear_protocol")})
    for metric, title, nd in sections:
        if metric == "linear_top1" and protocols:
            title += f" — {', '.join(protocols)}"
        if pivot.has(metric):
            md += [f"## {title}", "", *pivot.table(metric, nd), ""]
    fig = plot_vs_column(pivot, ["knn_top1", "linear_top1"], fig_dir / "accuracy_vs_kernel.png")
    if fig is not None:
        md += ["## Accuracy vs kernel size — Figure 2 style", "",
               f"![accuracy vs {pivot.col_key}]({os.path.relpath(fig, out_dir)})", ""]
    if pivot.has("corruption_error"):
        md += ["## Robustness — Table 5 style", "",
               "Errors (%) of the linear probe on the evaluation split, clean and under the 15 ImageNet-C "
               "corruptions at 5 severities made on the fly (lower is better). Mean corruption error:", "",
               *pivot.table("corruption_error"), "", "By corruption family and clean error:", ""]
        groups = [g for g in ("noise", "blur", "weather", "digital")
                  if any(g in (r or {}).get("corruption_error_by_group", {}) for r in results.values())]
        rows = []
        for row in pivot.rows:
            for c, label in zip(pivot.cols, pivot.col_labels):
                rs = pivot.cells.get((row, c), [])
                if rs:
                    by = [fmt_cell([r["corruption_error_by_group"][g] for r in rs
                                    if g in r.get("corruption_error_by_group", {})]) for g in groups]
                    rows.append([f"{row}, {label}", fmt_cell([r["clean_error"] for r in rs if "clean_error" in r]),
                                 fmt_cell([r["corruption_error"] for r in rs if "corruption_error" in r]), *by])
        md += _table(["run", "clean", "all corruptions", *groups], rows)
        n_img = sorted({r.get("robustness_images") for r in results.values() if r and r.get("robustness_images")})
        md += ["", f"Images per cell: {', '.join(map(str, n_img))}.", ""]

    cams = {}
    if sweep.cam and done and any(r and "linear_top1" in r for r in results.values()):
        try:
            cams = cam_grids(sweep, pivot, results, fig_dir)
        except Exception as e:  # a CAM failure must not lose the tables above
            log.warning("sweep: CAM grids failed: %s", e)
            md += [f"CAM grids failed: {e}", ""]
    if cams:
        md += ["## Grad-CAM vs kernel size — Table 6 style", "",
               "Mean fraction of each Grad-CAM map above 0.5 (target: the linear probe's predicted class), "
               "first seed, the same images (one per class) for every run:", "",
               *_table(["", *pivot.col_labels], [[row, *[_f(c["area"].get(k), 3) for k in pivot.cols]]
                                                 for row, c in cams.items()]), ""]
        for row, c in cams.items():
            md += [f"**{row}**", "", f"![Grad-CAM {row}]({os.path.relpath(c['png'], out_dir)})", ""]

    md += ["## Runs", "", *_table(["run", "k-NN", "random init k-NN", "linear", "train s", "wall s"], [
        [f"`{name}`", "not finished", "", "", "", ""] if r is None else
        [f"`{name}`", _f(r.get("knn_top1")), _f(r.get("random_knn_top1")), _f(r.get("linear_top1")),
         _f(r.get("train_s"), 0), _f(r.get("wall_s"), 0)]
        for name, r in results.items()])]
    report = out_dir / "report.md"
    report.write_text("\n".join(md) + "\n")
    summary = {"out": str(out_dir), "report": str(report), "finished": len(done), "total": len(results),
               "missing": missing,
               "tables": {m: {row: {c: pivot.values(row, c, m) for c in pivot.cols} for row in pivot.rows}
                          for m in sweep_metrics() if pivot.has(m)},
               "cam_area": {row: c["area"] for row, c in cams.items()},
               "figures": [str(p) for p in ([fig] if fig else []) + [c["png"] for c in cams.values()]]}
    write_json(out_dir / "summary.json", summary)
    return summary

