"""``bcssl eval embedding RUN``: the eval backbone's features of the evaluation split projected to
2-D and drawn as a scatter coloured by class -- what SSL users look at before any number
(solo-learn and mmpretrain ship the same plot).

The projection is t-SNE from scikit-learn (``umap-learn`` does not install in bcssl's
environment; t-SNE shows the same thing: whether classes form separate clusters) on the
L2-normalised features (the k-NN's cosine geometry), ``perplexity`` 30, PCA initialisation,
seeded; ``--method pca`` is the fast linear alternative. At most ``--limit`` points (5000),
strided over the split so that every class of a class-sorted folder is drawn.

Writes ``embedding.png``, ``embedding.csv`` (index in the split, label, x, y) and
``embedding.json``; the report shows the picture.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bcssl.eval.registry import Evaluation

METHODS = ("tsne", "pca")


def project(features: torch.Tensor, method: str = "tsne", *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) coordinates: t-SNE or PCA of the L2-normalised features."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in METHODS:
        raise ValueError(f"embedding method must be one of {', '.join(METHODS)}, got {method!r}")
    x = F.normalize(features.float(), dim=1).numpy()
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if len(x) <= perplexity:
        raise ValueError(f"t-SNE with perplexity {perplexity} needs more than {perplexity:g} points, got {len(x)}")
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def scatter(coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> Path:
    """A PNG scatter of ``coords`` coloured by class (a legend up to 20 classes)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n_classes = len(class_names)
    cmap = colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    size = max(2.0, min(12.0, 12000 / max(len(coords), 1)))
    for c in range(n_classes):
        m = labels == c
        if m.any():
            colour = cmap(c % cmap.N) if n_classes <= 20 else cmap(c / max(n_classes - 1, 1))
            ax.scatter(coords[m, 0], coords[m, 1], s=size, color=colour, alpha=0.7, linewidths=0,
                       label=str(class_names[c]))
    if n_classes <= 20:
        ax.legend(fontsize=7, markerscale=max(1.0, 18 / size), loc="best", framealpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def embedding_of_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, method: str = "tsne",
                     limit: int | None = 5000, perplexity: float = 30.0, progress: bool = True) -> dict:
    from bcssl.data import dataset_from_config
    from bcssl.engine import distributed as ddp
    from bcssl.engine.run_dir import write_json
    from bcssl.engine.runtime import load_run
    from bcssl.eval.features import run_features
    from bcssl.eval.robustness import subset_indices

    run = Path(run_dir)
    loaded = load_run(run, overrides)
    cfg, d = loaded.cfg, loaded.cfg.data
    with ddp.process_group(cfg.device) as (dist, device):
        ds = dataset_from_config(d, d.eval_split)
        feats, labels = run_features(loaded, d.eval_split, device=device, progress=progress, dataset=ds)
        if not dist.is_main:
            return {}
    keep = list(subset_indices(len(labels), limit, "strided"))
    coords = project(feats[keep], method, perplexity=perplexity, seed=int(cfg.seed))
    y = labels[keep].numpy()
    classes = list(getattr(ds, "classes", None) or range(int(ds.num_classes)))
    png = scatter(coords, y, classes, run / "embedding.png",
                  f"{run.name}: {method} of {len(keep)} {d.eval_split} features ({loaded.encoder})")
    table = run / "embedding.csv"
    tmp = table.with_name(f".{table.name}.tmp.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "x", "y"])
        w.writerows([i, int(lab), f"{a:.6g}", f"{b:.6g}"] for i, lab, (a, b) in zip(keep, y, coords))
    os.replace(tmp, table)
    result = {"run_dir": str(run), "method": method, "perplexity": perplexity if method == "tsne" else None,
              "n_points": len(keep), "of": int(len(labels)), "sampling": "strided", "split": d.eval_split,
              "feature_dim": int(feats.shape[1]), "png": str(png), "coordinates": str(table),
              "seed": int(cfg.seed), "encoder": loaded.encoder, "checkpoint_sha256": loaded.checkpoint_sha256}
    write_json(run / "embedding.json", result)
    return result


class Embedding(Evaluation):
    name = "embedding"
    distributed = True  # the features; the projection runs on rank 0

    def add_arguments(self, parser) -> None:
        parser.add_argument("--method", default="tsne", choices=list(METHODS),
                            help="t-SNE (scikit-learn; default) or PCA (fast, linear)")
        parser.add_argument("--limit", type=int, default=5000,
                            help="points drawn, strided over the split (default 5000; 0 = all)")
        parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")

    def run(self, run_dir, overrides=(), *, progress: bool = True, method: str = "tsne", limit: int | None = 5000,
            perplexity: float = 30.0, **options) -> dict:
        return embedding_of_run(run_dir, overrides, method=method, limit=limit or None, perplexity=perplexity,
                                progress=progress)

    def summary(self, r: dict, run_dir) -> str:
        return f"{r['method']} of {r['n_points']} of {r['of']} features: {r['png']}, coordinates {r['coordinates']}"

    def report_section(self, runs, out_dir: Path, fig_dir: Path) -> list[str]:
        from bcssl.eval.report import _safe

        lines = []
        for r in runs:
            e, png = r.results.get("embedding"), r.path / "embedding.png"
            if not e or not png.is_file():
                continue
            if png.parent.resolve() == out_dir.resolve():
                rel = png.name
            else:
                fig_dir.mkdir(parents=True, exist_ok=True)
                dest = fig_dir / f"embedding_{_safe(r.name)}.png"
                shutil.copyfile(png, dest)
                rel = dest.relative_to(out_dir).as_posix()
            if len(runs) > 1:
                lines += [f"### {r.label}", ""]
            lines += [f"![{e.get('method')} of {r.name}]({rel})", "",
                      f"*{e.get('method')} of {e.get('n_points')} of {e.get('of')} {e.get('split')} features "
                      f"({e.get('sampling')}), coloured by class; coordinates in `embedding.csv`*", ""]
        return ["## Feature embedding", "", *lines] if lines else []


EVALUATION = Embedding()
