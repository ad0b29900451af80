"""`bcssl eval embedding`: 2-D t-SNE / PCA of the eval features, a scatter by class, the coordinates."""
import csv
import json

import numpy as np
import pytest
import torch

from bcssl.cli import main
from bcssl.engine.trainer import train
from bcssl.eval.embedding import project
from tests.conftest import tiny_config


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_separate_clusters_stay_separate_in_2d(method):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=g) * 5
    y = torch.arange(4).repeat(30)
    x = centres[y] + 0.2 * torch.randn(len(y), 64, generator=g)
    xy = torch.from_numpy(np.asarray(project(x, method, perplexity=10, seed=0), dtype=np.float32))
    assert xy.shape == (120, 2) and torch.isfinite(xy).all()
    d = torch.cdist(xy, xy) + torch.eye(len(y)) * 1e9  # each point's nearest neighbour in 2-D: same class
    assert (y[d.argmin(1)] == y).float().mean() == 1.0
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert (shuffled[d.argmin(1)] == shuffled).float().mean() < 0.6  # the check can fail


def test_eval_embedding_writes_scatter_coordinates_and_report(tmp_path, tiny_fmnist, capsys):
    run = train(tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")).run_dir
    assert main(["eval", "embedding", run, "--limit", "20", "--perplexity", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["method"], r["n_points"], r["of"], r["sampling"]) == ("tsne", 20, 32, "strided")
    rows = list(csv.DictReader(open(f"{run}/embedding.csv")))
    assert len(rows) == 20 and all(np.isfinite(float(row["x"])) and np.isfinite(float(row["y"])) for row in rows)
    labels = torch.load(next((tmp_path / "runs" / "tiny" / "cache").glob("features-*.pt")), weights_only=True)["labels"]
    assert [int(row["label"]) for row in rows] == [int(labels[int(row["index"])]) for row in rows]
    assert main(["report", run]) == 0
    assert "![tsne of tiny](embedding.png)" in open(f"{run}/report.md").read()
