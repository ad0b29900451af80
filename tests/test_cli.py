"""The command line: clear errors, --json, pretrain -> eval knn, demo report."""
import json
import subprocess
import sys

import pytest

from bcssl.cli import main
from tests.conftest import TINY_CROPS, TINY_HEAD, TINY_MODEL

FAST = ["train.epochs=1", "train.batch_size=16", "train.progress=false", "log.backends=[csv]",
        "data.workers=0", "threads=1", "eval.batch_size=64", *TINY_MODEL, *TINY_HEAD, *TINY_CROPS]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_unknown_key_exits_nonzero_naming_closest(capsys):
    assert main(["pretrain", "--config", "demo_fmnist", "train.epoch=1"]) != 0
    err = capsys.readouterr().err
    assert "train.epochs" in err and "Traceback" not in err


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    assert main(["pretrain", "--config", "demo_fmnist", f"data.root={tmp_path}/nothing",
                 f"run.dir={tmp_path}"]) != 0
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_pretrain_then_eval_knn_json(tmp_path, tiny_fmnist, capsys):
    run = ["--config", "demo_fmnist", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", "run.name=cli", *FAST]
    assert main(["pretrain", *run, "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert {"run_dir", "epochs", "images_seen", "train_s", "imgs_per_s", "knn_top1"} <= out.keys()
    assert 0 <= out["knn_top1"] <= 100 and out["images_seen"] == 64
    knn_records = [json.loads(x) for x in open(f"{tmp_path}/cli/metrics.jsonl") if '"knn"' in x]
    assert knn_records and knn_records[-1]["top1"] == out["knn_top1"]  # the k-NN monitor (knn_every=1)
    assert main(["eval", "knn", f"{tmp_path}/cli", "--json"]) == 0
    ev = last_json(capsys.readouterr().out)
    assert ev["knn_top1"] == pytest.approx(out["knn_top1"])  # same weights, same protocol
    assert json.load(open(f"{tmp_path}/cli/knn.json"))["knn_top1"] == ev["knn_top1"]
    # Overrides may also follow an option; an unknown option is still refused.
    assert main(["eval", "knn", f"{tmp_path}/cli", "--json", "eval.knn_k=5"]) == 0
    assert last_json(capsys.readouterr().out)["k"] == 5
    with pytest.raises(SystemExit):
        main(["eval", "knn", f"{tmp_path}/cli", "--json", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_version_names_bcssl_and_torch(capsys):
    import bcssl
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bcssl {bcssl.__version__} (torch ") and bcssl.__version__ != "0+unknown"


def test_eval_knn_on_non_run_is_clear(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path)]) != 0
    assert "not a bcssl run directory" in capsys.readouterr().err


def test_demo_writes_report_with_baselines(tmp_path, tiny_fmnist, capsys):
    assert main(["demo", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", *FAST, "--json"]) == 0
    s = last_json(capsys.readouterr().out)
    for key in ("knn_top1", "baseline_pixels_knn_top1", "baseline_random_knn_top1", "wall_s"):
        assert 0 <= s[key] <= (100 if "knn" in key else 1e6), key
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "pixels" in report.lower() and "random" in report.lower()
    assert f"{s['knn_top1']:.2f}" in report
    assert (tmp_path / "demo" / "figures" / "knn.png").exists() and (tmp_path / "demo" / "figures" / "loss.png").exists()
    assert main(["report", f"{tmp_path}/demo", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["report"].endswith("report.md")


def test_presets_and_module_entry_point(capsys):
    assert main(["presets", "--json"]) == 0
    assert "demo_fmnist" in last_json(capsys.readouterr().out)["presets"]
    out = subprocess.run([sys.executable, "-m", "bcssl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_eval_linear_then_robustness(tmp_path, tiny_fmnist, capsys):
    run = ["--config", "demo_fmnist", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", "run.name=ev", *FAST,
           "eval.final_knn=false", "eval.knn_every=0"]
    assert main(["pretrain", *run]) == 0
    assert main(["eval", "robustness", f"{tmp_path}/ev"]) != 0  # no linear probe yet: a clear error
    assert "bcssl eval linear" in capsys.readouterr().err
    assert main(["eval", "linear", f"{tmp_path}/ev", "linear.epochs=3", "--json"]) == 0
    lin = last_json(capsys.readouterr().out)
    assert 0 <= lin["linear_top1"] <= 100 and (tmp_path / "ev" / "linear.safetensors").exists()
    assert main(["eval", "robustness", f"{tmp_path}/ev", "--corruptions", "gaussian_noise,contrast",
                 "--severities", "1,5", "--limit", "8", "--json"]) == 0
    rob = last_json(capsys.readouterr().out)
    assert set(rob["errors"]) == {"gaussian_noise", "contrast"} and len(rob["errors"]["contrast"]) == 2
    assert json.load(open(tmp_path / "ev" / "robustness.json"))["fashion_mnist_c"]["n_images"] == 8
    assert main(["viz", "cam", f"{tmp_path}/ev", "--n", "3", "--json"]) == 0
    cam = last_json(capsys.readouterr().out)
    assert cam["n_images"] == 3 and (tmp_path / "ev" / "cam.png").exists()
    # the per-model evaluation through the same interface: RUN/throughput.json, read by the report
    assert main(["eval", "throughput", f"{tmp_path}/ev", "throughput.resolution=32", "throughput.batch_size=2",
                 "throughput.warmup=1", "throughput.iters=1", "throughput.repeats=1", "--json"]) == 0
    rows = last_json(capsys.readouterr().out)["rows"]
    assert {r["fold_bn"] for r in rows} == {True, False} and (tmp_path / "ev" / "throughput.json").exists()
    assert main(["eval", "cam", f"{tmp_path}/ev", "cam.n_images=2", "cam.methods=[eigencam]", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["n_images"] == 2
    assert main(["report", f"{tmp_path}/ev"]) == 0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "cam.png" in report and "linear" in report.lower() and "## Throughput" in report
    assert "cached_features" in report  # the protocol behind the linear number
    assert "8 images (subset of 8 of 32, first)" in report


def test_bench_throughput_json(capsys):
    assert main(["bench", "throughput", "--models", "bcssl_atto", "--resolution", "32", "--batch", "2",
                 "--warmup", "1", "--iters", "1", "--repeats", "1", "--compare-unfolded", "--json"]) == 0
    rows = last_json(capsys.readouterr().out)["rows"]
    assert {r["fold_bn"] for r in rows} == {True, False} and all(r["img_per_s"] > 0 for r in rows)
    assert main(["bench", "throughput", "--models", "bcssl_tt"]) != 0
    assert "bcssl_t" in capsys.readouterr().err


def test_every_eval_command_on_a_tiny_image_folder(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in (("n01", (200, 30, 30)), ("n02", (30, 30, 200))):
            d = tmp_path / "folder" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (40 + i, 36), tuple(max(0, v - 10 * i) for v in colour)).save(d / f"{i}.png")
    run = ["--config", "demo_fmnist", "data.name=image_folder", f"data.root={tmp_path / 'folder'}",
           "data.eval_split=val", "eval.data.resize_size=36", "eval.data.crop_size=32", f"run.dir={tmp_path}", "run.name=if", *FAST,
           "train.batch_size=8"]
    assert main(["pretrain", *run]) == 0
    r = f"{tmp_path}/if"
    assert main(["eval", "knn", r, "--json"]) == 0
    assert 0 <= last_json(capsys.readouterr().out)["knn_top1"] <= 100
    assert main(["eval", "linear", r, "linear.epochs=2", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["num_classes"] == 2
    assert main(["eval", "robustness", r]) != 0  # on-the-fly corruptions need an in-memory set
    assert "--kind imagenet_c" in capsys.readouterr().err
    assert main(["viz", "cam", r, "--images", str(tmp_path / "folder" / "val" / "n01"), "--json"]) == 0
    assert last_json(capsys.readouterr().out)["n_images"] == 8
    assert main(["report", r]) == 0
    assert (tmp_path / "if" / "figures" / "loss.png").exists()


def test_config_show_prints_the_resolved_yaml(capsys):
    assert main(["config", "show", "imagenet_bcssl_t_300ep", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    train_section = out[out.index("\ntrain:"):]
    assert "  lr: 0.001\n" in train_section and "  epochs: 300\n" in train_section


def test_missing_required_key_fails_fast_without_a_folder(tmp_path):
    """An ImageFolder preset with no data.root: one line, before torch is imported, no folder made."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bcssl", "pretrain", "--config",
                           "imagenet_bcssl_t_300ep", f"run.dir={tmp_path}/runs", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == ["bcssl: error: data.root is not set: data.name=image_folder needs the image folder, e.g. "
                      "data.root=/data/imagenet (with train/ and val/ class folders)"]
    assert last_json(proc.stdout) == {"error": errors[0][len("bcssl: error: "):], "kind": "ConfigError"}
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported  # (the 2 s bound of the check is then only Python + OmegaConf)
    assert not (tmp_path / "runs").exists()


def test_dry_run_plans_without_creating_anything(tmp_path, tiny_fmnist, capsys):
    args = ["pretrain", "--config", "demo_fmnist", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}/runs", *FAST]
    assert main([*args, "--dry-run", "--json"]) == 0
    plan = last_json(capsys.readouterr().out)
    assert plan["images"] == 64 and plan["global_batch"] == 16 and plan["steps_per_epoch"] == 4
    assert plan["lr"] == pytest.approx(1e-3 * 16 / 256)  # the preset's train.lr scaled to the global batch
    assert plan["backbone_params"] > 0 and plan["backbone_gmacs_global"] > plan["backbone_gmacs_local"] > 0
    assert main([*args, "--dry-run", "--nproc", "4"]) == 0  # the plan of 4 processes, none started
    assert "global batch 64" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_group_without_subcommand_lists_its_subcommands(capsys):
    for group, sub in (("eval", "knn"), ("viz", "cam"), ("bench", "throughput"), ("config", "show")):
        assert main([group]) == 2
        out = capsys.readouterr().out
        assert out.startswith(f"usage: bcssl {group}") and sub in out


def test_json_errors_and_hydra_style_overrides(capsys):
    assert main(["pretrain", "--config", "demo_fmnist", "+train.lr=1", "--json"]) == 1
    captured = capsys.readouterr()
    assert "bcssl overrides only existing keys" in captured.err and "train.lr=VALUE" in captured.err
    assert last_json(captured.out)["kind"] == "ConfigError"
    assert main(["pretrain", "--config", "demo_fmnist", "~model.depths", "--json"]) == 1
    assert "model.depths=null" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "knn", "--json"])  # usage error: the run is missing
    assert exc.value.code == 2 and last_json(capsys.readouterr().out)["kind"] == "UsageError"


def test_every_argument_has_help():
    from bcssl.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.help is None:
                yield f"{path}: {'/'.join(action.option_strings) or action.dest}"

    import argparse

    from bcssl.eval.registry import names
    # an evaluation's own options are added when it is the one chosen on the command line
    missing = [m for argv in [[]] + [["eval", n] for n in names()] for m in walk(build_parser(argv), "bcssl")]
    assert sorted(set(missing)) == []


def test_unlabelled_pretraining_then_knn_with_a_labelled_set(tmp_path, capsys, caplog):
    """A flat folder and a file list pre-train without labels (the k-NN monitor says it is off);
    `bcssl eval knn` then takes a labelled set (eval.data.root); viz crops shows the crops."""
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    flat, labelled = tmp_path / "flat", tmp_path / "labelled"
    flat.mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype="uint8")).resize((40 + 3 * i, 60 - 2 * i)).save(
            flat / f"{i}.jpg")
    for split in ("train", "val"):
        for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            (labelled / split / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40 + i, 36), tuple(max(0, v - 10 * i) for v in colour)).save(labelled / split / c / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(0, 16, 2)))
    common = ["--config", "demo_fmnist", "data.name=image_folder", f"data.root={flat}", "data.eval_split=val",
              f"run.dir={tmp_path}", "eval.data.resize_size=36", "eval.data.crop_size=32", *FAST, "train.batch_size=4"]
    with caplog.at_level("WARNING", logger="bcssl"):
        assert main(["pretrain", *common, "run.name=flatrun", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["images_seen"] == 16 and out["knn_top1"] is None
    assert any(r.getMessage().startswith("k-NN monitor off: evaluations need class labels") for r in caplog.records)
    assert main(["eval", "knn", f"{tmp_path}/flatrun"]) == 1
    err = capsys.readouterr().err
    assert "eval.data.root=DIR" in err and err.count("\n") == 1
    assert main(["eval", "knn", f"{tmp_path}/flatrun", f"eval.data.root={labelled}", "--json"]) == 0
    assert 0 <= last_json(capsys.readouterr().out)["knn_top1"] <= 100
    # a file list (8 of the images), with the labelled set for the monitor from the start
    assert main(["pretrain", *common, f"data.file_list={tmp_path / 'list.txt'}", f"eval.data.root={labelled}",
                 "run.name=listrun", "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out["images_seen"] == 8 and 0 <= out["knn_top1"] <= 100
    assert main(["eval", "knn", f"{tmp_path}/listrun", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["knn_top1"] == pytest.approx(out["knn_top1"])
    # viz crops: a PNG, and every crop's box in the original image's pixels
    png = tmp_path / "crops.png"
    assert main(["viz", "crops", *common[:2], "crops.n_local=3", "--images", str(flat), "--n", "2", "--json",
                 "--out", str(png)]) == 0
    r = last_json(capsys.readouterr().out)
    assert png.is_file() and r["png"] == str(png) and len(r["images"]) == 2
    for entry in r["images"]:
        assert (entry["width"], entry["height"]) == Image.open(entry["path"]).size
        assert [c["kind"] for c in entry["crops"]] == ["global"] * 2 + ["local"] * 3
        for c in entry["crops"]:
            x0, y0, x1, y1 = c["box"]
            assert 0 <= x0 < x1 <= entry["width"] and 0 <= y0 < y1 <= entry["height"] and isinstance(c["flip"], bool)


def test_resume_with_another_config_is_one_line_and_resume_changed_continues(tmp_path, tiny_fmnist, capsys):
    run = ["--config", "demo_fmnist", f"data.root={tiny_fmnist}", f"run.dir={tmp_path}", "run.name=r", *FAST,
           "eval.final_knn=false", "eval.knn_every=0", "data.limit=32"]
    assert main(["pretrain", *run]) == 0
    capsys.readouterr()
    assert main(["pretrain", *run, "model.kernel_size=5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.kernel_size (3 -> 5)" in err and "Traceback" not in err
    assert main(["pretrain", *run, "train.epochs=2", "--json"]) == 1
    assert "--resume-changed" in capsys.readouterr().err
    assert main(["pretrain", *run, "train.epochs=2", "--resume-changed", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["images_seen"] == 64
