"""bcssl demo: the wall-clock budget (plan, saved decision, exact resume) and both pixel baselines."""
import json

import pytest

import bcssl.demo as demo
from bcssl.cli import main
from tests.conftest import tiny_config
from tests.test_cli import FAST, last_json


def fake_probe(rate):
    return lambda cfg: {"imgs_per_s": rate, "steps": 5, "setup_s": 0.5}


@pytest.mark.parametrize("knn_every", [0, 1])
def test_plan_fills_the_budget_and_no_more(tmp_path, tiny_fmnist, monkeypatch, knn_every):
    monkeypatch.setattr(demo, "probe_speed", fake_probe(40.0))
    cfg = tiny_config(tmp_path, tiny_fmnist, "demo.budget_min=2", f"eval.knn_every={knn_every}",
                      "eval.knn_train_limit=32", "eval.knn_test_limit=16")
    plan = demo.plan_budget(cfg, spent_s=10.0, eval_s=4.8, n_eval=96, steps_per_epoch=4)
    reserved = sum(v for k, v in plan.items() if k.startswith("reserved_"))
    total = plan["spent_before_training_s"] + plan["planned_train_s"] + reserved
    one_step_s = cfg.train.batch_size / 40.0
    assert total <= 120 + 0.2  # rounding of the recorded seconds
    # one more step, and the monitor run it might add, would not fit
    extra_monitor = 48 * 4.8 / 96 if knn_every and plan["steps"] % 4 == 0 else 0
    assert total + one_step_s + extra_monitor > 120 - 0.2
    assert plan["reserved_monitor_knn_s"] == pytest.approx(
        (-(-plan["steps"] // 4) if knn_every else 0) * 48 * 4.8 / 96, abs=0.06)
    assert plan["images"] == plan["steps"] * cfg.train.batch_size and plan["epochs"] == plan["steps"] / 4


def test_speed_probe_trains_the_real_run_in_a_scratch_folder(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "demo.probe_steps=3", "log.backends=[tensorboard,csv]")
    speed = demo.probe_speed(cfg)
    assert speed["steps"] == 2 and speed["imgs_per_s"] > 0 and speed["setup_s"] >= 0
    assert not (tmp_path / "runs").exists()  # the probe leaves nothing in the run folder


def test_plan_says_when_nothing_fits(tmp_path, tiny_fmnist, monkeypatch):
    monkeypatch.setattr(demo, "probe_speed", fake_probe(40.0))
    cfg = tiny_config(tmp_path, tiny_fmnist, "demo.budget_min=0.2")
    with pytest.raises(demo.TrainingError, match="leaves no time to train"):
        demo.plan_budget(cfg, spent_s=10.0, eval_s=4.8, n_eval=96, steps_per_epoch=4)


def test_budgeted_demo_saves_its_plan_and_resumes_it(tmp_path, tiny_fmnist, monkeypatch, capsys):
    monkeypatch.setattr(demo, "process_age_s", lambda: 0.0)  # pytest's own age is not the command's
    monkeypatch.setattr(demo, "probe_speed", fake_probe(4.0))
    fast = [o for o in FAST if not o.startswith("train.epochs")]
    args = ["demo", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", *fast, "eval.knn_train_limit=32",
            "eval.knn_test_limit=16", "--budget-min", "0.7", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    s = last_json(out)
    plan = json.loads((tmp_path / "demo" / "budget.json").read_text())
    assert "budget 0.7 min" in out and f"train {plan['steps']} steps" in out
    assert 1 <= plan["steps"] and s["budget"] == plan
    assert s["images_seen"] == plan["steps"] * 16  # the run trained exactly the planned length
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "demo" / "metrics.jsonl")) if r["kind"] == "train"]
    assert max(steps) == plan["steps"]
    # both pixel baselines, on the full sets and on the monitor's bank, and the figure's subset numbers
    assert 0 <= s["baseline_centred_pixels_knn_top1"] <= 100
    mon = s["monitor_baselines"]
    assert (mon["bank"], mon["queries"]) == (32, 16)
    assert {"pixels_knn_top1", "centred_pixels_knn_top1", "random_knn_top1", "pretrained_knn_top1"} <= mon.keys()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "mean-centred pixels" in report and "monitor bank (32 / 16)" in report

    # a rerun (as after a kill) reuses the saved decision even though the machine now looks faster
    monkeypatch.setattr(demo, "probe_speed", fake_probe(1000.0))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming with the saved plan" in out and last_json(out)["images_seen"] == plan["steps"] * 16


def test_explicit_length_is_fixed_and_conflicts_with_budget(tmp_path, tiny_fmnist, capsys):
    assert main(["demo", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", *FAST, "--budget-min", "5"]) != 0
    err = capsys.readouterr().err
    assert "--budget-min" in err and "train.epochs=1" in err and "Traceback" not in err


def test_centred_pixel_baseline_is_cosine_knn_of_pixels_minus_their_mean(tmp_path, tiny_fmnist):
    from bcssl.eval.knn import KNNEvaluator

    cfg = tiny_config(tmp_path, tiny_fmnist, "eval.knn_train_limit=32", "eval.knn_test_limit=16")
    ev = KNNEvaluator(cfg, "cpu", progress=False)
    out = demo.pixel_baselines(ev, demo.Banks(cfg, 10))
    # what the centred baseline is: plain cosine k-NN on pixels minus the bank's mean pixel vector
    x = ev.train_set.images.flatten(1).float()
    q = ev.test_set.images.flatten(1).float()
    m = x.mean(0, keepdim=True)
    ref = demo.knn_classify(x - m, ev.train_set.labels, q - m, ev.test_set.labels, k=cfg.eval.knn_k,
                            temperature=cfg.eval.knn_temperature, num_classes=10)
    assert out["pixels_centred"]["full"]["top1"] == pytest.approx(ref["top1"])
    sub = demo.knn_classify(x[:32], ev.train_set.labels[:32], q[:16], ev.test_set.labels[:16], k=cfg.eval.knn_k,
                            temperature=cfg.eval.knn_temperature, num_classes=10)
    assert out["pixels"]["monitor"]["top1"] == pytest.approx(sub["top1"])
