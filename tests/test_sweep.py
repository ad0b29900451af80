"""``bcssl sweep``: a 2 x 2 grid end to end, with a run interrupted mid-training and one
interrupted before its evaluation, then resumed; skip of finished runs; the summary."""
import json

import pytest

import bcssl.engine.trainer as trainer
from bcssl.cli import main
from bcssl.config import ConfigError
from bcssl.sweep import Sweep, parse_grid
from tests.conftest import TINY_CROPS, TINY_HEAD, TINY_MODEL

FAST = ["train.epochs=1", "train.batch_size=16", "train.progress=false", "log.backends=[csv]",
        "data.workers=0", "threads=1", "eval.batch_size=64", "eval.knn_every=0", "eval.final_knn=false",
        "train.checkpoint_every_steps=1", "train.log_every_steps=1", "linear.epochs=2", "robustness.corruption_limit=4",
        *TINY_MODEL, *TINY_HEAD, *TINY_CROPS]
GRID = ["model.kernel_size=3,5", "model.dw_norm=ln,bn+ln"]


def test_parse_grid_and_bad_grids():
    assert parse_grid(GRID) == {"model.kernel_size": ["3", "5"], "model.dw_norm": ["ln", "bn+ln"]}
    # list values keep their commas; the run names spell them without brackets
    grid = parse_grid(["model.kernel_size=9,[3,5,7,9]", "crops.global_scale=[0.6, 1.0]"])
    assert grid == {"model.kernel_size": ["9", "[3,5,7,9]"], "crops.global_scale": ["[0.6, 1.0]"]}
    from bcssl.sweep import Combination
    combo = Combination(0, (("model.kernel_size", "[3,5,7,9]"), ("crops.global_scale", "[0.6, 1.0]")), 0)
    assert combo.name == "kernel_size=3-5-7-9,global_scale=0.6-1.0,seed=0"
    for bad in (["model.kernel_size"], ["model.kernel_size="], ["a=1", "a=2"], ["model.kernel_size=3,3"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_unknown_grid_key_or_value_is_a_clear_error(tmp_path, tiny_fmnist):
    common = ["demo_fmnist", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.kernel_size"):
        Sweep(common[0], parse_grid(["model.kernel_sise=3,5"]), overrides=common[1:])
    assert main(["sweep", "--config", "demo_fmnist", "--grid", "model.dw_norm=ln,batchnorm",
                 f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", *FAST]) != 0


def test_sweep_runs_skips_resumes_and_summarizes(tmp_path, tiny_fmnist, monkeypatch, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "demo_fmnist", "--grid", *GRID, "--out", str(out),
            f"data.root={tiny_fmnist}", *FAST]

    # 1) an interruption in the middle of the second combination's training (step 2 of 4)
    real_clip, calls = trainer.clip_gradients_per_param, {"n": 0}

    def dying_clip(model, clip):
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # combination 0 makes 4 steps, then combination 1 dies at its 2nd
            raise KeyboardInterrupt
        real_clip(model, clip)

    monkeypatch.setattr(trainer, "clip_gradients_per_param", dying_clip)
    assert main(args) == 130  # "interrupted; rerun the same command to resume"
    monkeypatch.setattr(trainer, "clip_gradients_per_param", real_clip)
    sweep = Sweep("demo_fmnist", parse_grid(GRID), overrides=[f"data.root={tiny_fmnist}", *FAST], out=out)
    c0, c1, c2, c3 = sweep.combinations
    assert c0.name == "kernel_size=3,dw_norm=ln,seed=0"
    assert sweep.result(c0) is not None and sweep.result(c1) is None
    steps = [json.loads(x)["step"] for x in open(sweep.run_dir(c1) / "metrics.jsonl") if '"train"' in x]
    assert steps == [1]  # one finished step was checkpointed before the interruption

    # 2) an interruption after the third combination's training, before its evaluation
    real_eval = Sweep.evaluate

    def dying_eval(self, combo, progress=True):
        if combo.index == 2:
            raise KeyboardInterrupt
        return real_eval(self, combo, progress)

    monkeypatch.setattr(Sweep, "evaluate", dying_eval)
    assert main(args) == 130
    monkeypatch.setattr(Sweep, "evaluate", real_eval)
    assert sweep.result(c1) is not None and sweep.result(c2) is None
    assert (sweep.run_dir(c2) / "checkpoint.pt").exists()

    # 3) the same command finishes the rest: c0/c1 skipped, c2 only evaluated, c3 trained
    trained = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: trained.append(cfg.run.name) or real_train(cfg, **kw))
    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained == [c2.name, c3.name]
    assert summary["finished"] == summary["total"] == 4 and not summary["missing"]

    # resumed runs went through every step exactly once
    for c in (c1, c2):
        steps = [json.loads(x)["step"] for x in open(sweep.run_dir(c) / "metrics.jsonl") if '"train"' in x]
        assert steps == [1, 2, 3, 4], (c.name, steps)
    results = [sweep.result(c) for c in sweep.combinations]
    for r in results:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100
        assert 0 <= r["corruption_error"] <= 100 and set(r["corruption_error_by_group"]) == {
            "noise", "blur", "weather", "digital"}
        assert r["robustness_images"] == 4

    # the summary: Table 2 pivot (rows = dw_norm, columns = kernel), plots, robustness, CAM
    knn = summary["tables"]["knn_top1"]
    assert knn["dw_norm=bn+ln"]["5"] == [results[3]["knn_top1"]]
    assert knn["dw_norm=ln"]["3"] == [results[0]["knn_top1"]]
    md = (out / "report.md").read_text()
    assert "| dw_norm | kernel_size=3 | kernel_size=5 |" in md
    assert f"{results[3]['knn_top1']:.2f}" in md and "Table 5 style" in md and "Table 6 style" in md
    assert (out / "figures" / "accuracy_vs_kernel.png").stat().st_size > 1000
    assert set(summary["cam_area"]) == {"dw_norm=ln", "dw_norm=bn+ln"}
    assert set(summary["cam_area"]["dw_norm=ln"]) == {"3", "5"}
    cam = json.loads((out / "figures" / "cam_dw_norm_ln.json").read_text())
    assert [r["kernel_size"] for r in cam["rows"]] == ["3", "5"]  # one CAM row per kernel size

    # 4) a rerun trains nothing; another preset in the same folder is refused
    trained.clear()
    assert main(args) == 0 and trained == []
    assert main(["sweep", "--config", "demo_fmnist", "--grid", *GRID, "--out", str(out),
                 f"data.root={tiny_fmnist}", *FAST, "train.lr=0.1"]) == 1
    assert "use another --out" in capsys.readouterr().err


def test_list_index_and_slurm_script(tmp_path, tiny_fmnist, capsys):
    base = ["sweep", "--config", "demo_fmnist", "--grid", *GRID, "--seeds", "1,2", "--out", str(tmp_path / "s"),
            f"data.root={tiny_fmnist}", *FAST]
    assert main(base + ["--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["combinations"]
    assert len(rows) == 8 and rows[1]["name"] == "kernel_size=3,dw_norm=ln,seed=2"
    assert not any(r["finished"] for r in rows)
    assert main(base + ["--index", "9"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(base + ["--launcher", "slurm", "--gpus", "4"]) == 0
    script = (tmp_path / "s" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7" in script and "--nproc_per_node=4" in script
    assert '--index "$SLURM_ARRAY_TASK_ID" --train-only' in script


def test_random_init_evaluation_gives_each_cell_its_gain(tmp_path, tiny_fmnist):
    import torch

    from bcssl.engine.runtime import build_method
    from bcssl.eval.knn import KNNEvaluator

    over = [f"data.root={tiny_fmnist}", *FAST]
    sweep = Sweep("demo_fmnist", parse_grid(["model.kernel_size=3"]), overrides=over, out=tmp_path / "s",
                  evals=["knn", "random_init"], cam=False)
    summary = sweep.run(progress=False)
    (combo,) = sweep.combinations
    r = sweep.result(combo)
    cfg = sweep.run_config(combo)
    torch.manual_seed(0)  # the trainer's initialisation: seed 0, then build the method
    untrained = build_method(cfg).eval_backbone("auto")
    assert r["random_knn_top1"] == KNNEvaluator(cfg, "cpu", progress=False)(untrained)["top1"]
    assert r["knn_gain_over_random"] == pytest.approx(r["knn_top1"] - r["random_knn_top1"])
    report = open(summary["report"]).read()
    assert "gain of pre-training over random initialisation" in report
