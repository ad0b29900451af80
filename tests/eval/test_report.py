"""Report: markdown + figures from tiny synthetic run directories (no training, no model)."""
from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from bcssl.eval.report import knn_series, load_runs, plot_knn, plot_loss, write_report

CORR = ["gaussian_noise", "fog"]


def make_run(root, name, *, kernel=9, epochs=2, knn=True, extras=True, demo=False, n_train=8,
             nonfinite=False, bad_line=False):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"run": {"name": name, "dir": str(root)}, "data": {"name": "fashion_mnist"},
           "model": {"name": "bcssl_atto", "kernel_size": kernel, "dw_norm": "bn+ln", "stem_stride": 2},
           "method": {"name": "dino"}, "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
           "train": {"epochs": epochs, "batch_size": 64, "lr": 0.0005}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = []
    for i in range(n_train):
        step = 10 * (i + 1)
        recs.append({"kind": "train", "step": step, "epoch": step / 40, "loss": 6.0 - 0.3 * i + 0.01 * kernel,
                     "lr": 5e-4 * (1 - i / n_train), "wd": 0.04 + 0.01 * i, "imgs_per_s": 100.0 + i,
                     "teacher_temp": 0.04, "teacher_entropy": 0.5 + 0.02 * i,
                     "teacher_batch_entropy": 0.8})
        if knn and step % 40 == 0:
            recs.append({"kind": "knn", "step": step, "epoch": step // 40, "top1": 50.0 + kernel + step / 10,
                         "top5": 90.0})
    if nonfinite:
        recs.append({"kind": "nonfinite", "step": 15, "epoch": 0.375, "loss": None})
    lines = [json.dumps(r) for r in recs]
    if bad_line:
        lines.append('{"kind": "train", "st')  # a run killed mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if extras:
        (run / "knn.json").write_text(json.dumps({"knn_top1": 71.23, "knn_top5": 97.65, "k": 20}))
        (run / "linear.json").write_text(json.dumps({"linear_top1": 81.47, "linear_top5": 99.02, "epochs": 5}))
        errs = {"gaussian_noise": [0.3, 0.4, 0.5, 0.6, 0.7], "fog": [0.2, 0.3, 0.4, 0.5, 0.6]}
        rob = {"imagenet_c": {"benchmark": "imagenet_c", "corruptions": CORR, "severities": [1, 2, 3, 4, 5],
                              "errors": errs, "mean_error_by_corruption": {"gaussian_noise": 0.5, "fog": 0.4},
                              "clean_error": 0.15, "mean_error": 0.45, "normalised_by_alexnet": True,
                              "ce": {"gaussian_noise": 55.5, "fog": 44.4}, "mce": 49.95, "n_images": 8},
               "imagenet_a": {"benchmark": "imagenet_a", "top1": 12.34, "error": 0.8766, "n_images": 8}}
        (run / "robustness.json").write_text(json.dumps(rob))
        (run / "throughput.json").write_text(json.dumps({"rows": [
            {"model": "bcssl_atto", "kernel_size": kernel, "params_m": 3.7, "gmacs": 0.55, "img_per_s": 1234.5}]}))
        Image.new("RGB", (64, 32), (200, 30, 30)).save(run / "cam.png")
        (run / "cam.json").write_text(json.dumps({"layer": "stages.3", "n_images": 8}))
        (run / "detection.json").write_text(json.dumps({"box_AP": 46.31, "mask_AP": 41.29, "box_APl": None}))
    if demo:
        (run / "demo.json").write_text(json.dumps({
            "knn_top1": 72.5, "knn_top5": 98.0, "baseline_pixels_knn_top1": 61.11,
            "baseline_random_knn_top1": 55.55, "wall_s": 300.0, "train_s": 250.0, "imgs_per_s": 345.6,
            "images_seen": 120000, "epochs": 2}))
    return run


def assert_png(path, min_bytes=5000):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_single_run_report_has_every_number_and_figure(tmp_path):
    run = make_run(tmp_path, "k9", demo=True, nonfinite=True)
    path = write_report([run])
    assert path == run / "report.md"
    md = path.read_text()
    for number in ("71.23", "97.65",  # knn.json
                   "81.47", "99.02",  # linear.json
                   "45.00", "49.95", "12.34",  # robustness: mean error, mCE, ImageNet-A top-1
                   "55.50", "44.40", "70.00",  # per-corruption CE, gaussian_noise severity 5 error
                   "61.11", "55.55", "120,000", "345.6",  # demo baselines, images seen, img/s
                   "1234.5", "0.55",  # throughput
                   "46.31", "41.29"):  # detection.json
        assert number in md, number
    assert "k-NN from `knn.json` (k=20)" in md  # knn.json wins over demo.json and the monitor
    assert "bcssl_atto" in md and "bn+ln" in md and "dino" in md and "0.0005" in md and "| 64 |" in md
    assert "![k-NN top-1 against the epoch](figures/knn.png)" in md
    assert "(figures/loss.png)" in md and "](cam.png)" in md and "layer: stages.3" in md
    assert "1 non-finite loss step" in md
    assert_png(run / "figures" / "loss.png")
    assert_png(run / "figures" / "knn.png")


def test_several_runs_one_knn_curve_each(tmp_path):
    runs = [make_run(tmp_path / "runs", f"k{k}", kernel=k, extras=(k == 9)) for k in (3, 9, 13)]
    runs.append(make_run(tmp_path / "runs", "noknn", knn=False, extras=False))
    out = tmp_path / "cmp"
    path = write_report(runs, out, title="Kernel size sweep")
    md = path.read_text()
    assert md.startswith("# Kernel size sweep") and path == out / "report.md"
    assert [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| k")][:3] == ["k3", "k9", "k13"]
    # the CAM of a run outside out_dir is copied next to the report
    assert "](figures/cam_k9.png)" in md and (out / "figures" / "cam_k9.png").is_file()
    assert "](../runs/k3/config.yaml)" in md  # relative links to the runs

    loaded = load_runs(runs)
    series = knn_series(loaded)
    assert [s["run"] for s in series] == ["k3", "k9", "k13"]  # the run without k-NN records is left out
    assert series[0]["epoch"] == [1.0, 2.0] and series[0]["top1"] == [57.0, 61.0]
    labels = plot_knn(loaded, tmp_path / "knn.png")
    assert labels == ["k3 (bcssl_atto, k=3)", "k9 (bcssl_atto, k=9)", "k13 (bcssl_atto, k=13)"]
    assert plot_loss(loaded, tmp_path / "loss.png") == [r.label for r in loaded]
    assert_png(out / "figures" / "knn.png")
    assert_png(out / "figures" / "loss.png")
    with pytest.raises(ValueError, match="out_dir"):
        write_report(runs)


def test_sparse_run_and_missing_pieces(tmp_path):
    run = make_run(tmp_path, "young", knn=False, extras=False, n_train=2, bad_line=True)
    md = write_report(str(run)).read_text()  # one path, not in a list, is fine too
    assert "young" in md and "## Results" in md and "## Configuration" in md
    assert "k-NN monitor" not in md and "Robustness" not in md and "Throughput" not in md and "cam" not in md
    assert "1 unreadable line(s)" in md
    assert_png(run / "figures" / "loss.png")
    assert not (run / "figures" / "knn.png").exists()

    bare = tmp_path / "bare"  # only a config: still a report, no figures
    bare.mkdir()
    (bare / "config.yaml").write_text("run:\n  name: bare\n")
    md = write_report([bare]).read_text()
    assert "no `metrics.jsonl`" in md and "figures/" not in md


def test_not_a_run_dir_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        write_report([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report([make_run(tmp_path, "ok", extras=False), tmp_path / "nowhere"], tmp_path / "out")
