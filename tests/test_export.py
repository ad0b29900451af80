"""Export: BN-folded backbones as safetensors / TorchScript / ONNX / timm state dicts, each checked
against the unfolded model; ``load_backbone``; ``bcssl export`` on a tiny run."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

import bcssl
from bcssl.cli import main
from bcssl.export import (
    DEFAULT_NAMES,
    FORMATS,
    ExportError,
    export_backbone,
    load_backbone,
)
from bcssl.models import create_backbone, fold_bn
from tests.conftest import randomise, tiny_config

TOL = 1e-4
TINY = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "kernel_size": 9, "dw_norm": "bn+ln"}


def tiny(**kw) -> nn.Module:
    return randomise(create_backbone("bcssl_atto", **{**TINY, **kw})).eval()


def max_diff(a: nn.Module, b, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def test_random_bn_stats_make_folding_matter():
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    dropped = fold_bn(m)  # right architecture, BN simply removed (unfolded weights)
    dropped.load_state_dict({k: v for k, v in m.state_dict().items() if "bn_dw" not in k})
    assert max_diff(m, dropped, x) > 1e-2


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_equals_the_unfolded_model(tmp_path, fmt):
    m = tiny().train()  # the export must use eval-mode BN and restore the mode
    r = export_backbone(m, tmp_path / DEFAULT_NAMES[fmt], fmt, input_size=32)
    assert m.training and (r.path.is_dir() if fmt == "hf" else r.path.is_file()) and r.format == fmt
    assert r.max_abs_diff < TOL
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_NAMES[fmt]]  # no temporary file left
    m.eval()
    x = torch.randn(2, 3, 48, 40)  # another batch size and a non-square size than traced/checked
    if fmt == "onnx":  # straight onnxruntime, no bcssl wrapper
        import onnxruntime as ort

        sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(["features"], {"input": x.numpy()})[0])
        meta = sess.get_modelmeta().custom_metadata_map
        assert meta["input_size"] == "32" and meta["bn_folded"] == "true"
    elif fmt == "torchscript":
        got = torch.jit.load(str(r.path))(x)
    else:
        got = load_backbone(r.path)(x)
    with torch.no_grad():
        assert float((got - m(x)).abs().max()) < TOL
    loaded = load_backbone(r.path)  # every format goes through load_backbone
    assert not loaded.training and max_diff(m, loaded, x) < TOL
    assert loaded.bcssl_metadata["num_features"] == "64"
    if fmt == "safetensors":
        assert not any(isinstance(b, nn.BatchNorm2d) for b in loaded.modules())  # rebuilt folded


@pytest.mark.parametrize("kw", [
    {},  # bn+ln, k9, stem 4: timm convnext_tiny(depths, dims, kernel_sizes=9)
    {"stem_stride": 1, "kernel_size": [3, 5, 7, 9], "layer_scale_init": None, "in_chans": 1},
    {"dw_norm": "ln"},  # vanilla ConvNeXt
])
def test_timm_format_loads_strictly_into_timm(tmp_path, kw):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    m = tiny(**kw)
    r = export_backbone(m, tmp_path / "t.safetensors", "timm", input_size=32)
    with safe_open(str(r.path), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == r.timm_model == "convnext_tiny"
    ref = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"])).eval()
    ref.load_state_dict(load_file(str(r.path)), strict=True)
    x = torch.randn(2, m.in_chans, 40, 40)
    assert max_diff(m, ref, x) < TOL


def test_timm_variant_atto_loads_into_plain_create_model(tmp_path):
    import timm
    from safetensors.torch import load_file

    m = randomise(create_backbone("bcssl_atto", kernel_size=9)).eval()
    r = export_backbone(m, tmp_path / "atto.safetensors", "timm", input_size=32)
    assert (r.timm_model, r.timm_kwargs) == ("convnext_atto", {"kernel_sizes": 9, "num_classes": 0})
    ref = timm.create_model("convnext_atto", kernel_sizes=9, num_classes=0).eval()  # 1x1-conv MLPs in timm
    ref.load_state_dict(load_file(str(r.path)), strict=True)
    assert max_diff(m, ref, torch.randn(2, 3, 32, 32)) < TOL


def test_convnext_t_baseline_exports_to_timm(tmp_path):
    m = randomise(create_backbone("convnext_t", dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])).eval()
    r = export_backbone(m, tmp_path / "c.safetensors", "timm", input_size=32)
    assert r.timm_kwargs["kernel_sizes"] == 7
    assert max_diff(m, load_backbone(r.path), torch.randn(2, 3, 32, 32)) < TOL


@pytest.mark.parametrize("make,match", [
    (lambda: tiny(dw_norm="bn"), "dw_norm='bn'"),
    (lambda: tiny(stem_stride=2), "stem_stride=2"),
    (lambda: create_backbone("resnet50", depths=[1, 1, 1, 1], dims=[16, 32, 64, 128]), "ConvNeXt backbones"),
])
def test_timm_format_errors_for_what_timm_cannot_express(tmp_path, make, match):
    with pytest.raises(ExportError, match=match):
        export_backbone(make(), tmp_path / "x.safetensors", "timm", input_size=32)
    assert not any(tmp_path.iterdir())


def test_baseline_safetensors_needs_and_uses_its_registry_spec(tmp_path):
    kw = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
    m = randomise(create_backbone("resnet50", **kw)).eval()
    with pytest.raises(ExportError, match="model_name"):
        export_backbone(m, tmp_path / "r.safetensors", "safetensors", input_size=32)
    r = export_backbone(m, tmp_path / "r.safetensors", "safetensors", model_name="resnet50", model_kwargs=kw,
                        input_size=32)
    assert r.max_abs_diff < TOL and max_diff(m, load_backbone(r.path), torch.randn(2, 3, 32, 32)) < TOL


def test_failed_verification_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="verification failed"):
        export_backbone(tiny(), tmp_path / "b.safetensors", "safetensors", input_size=32, tolerance=-1.0)
    assert not any(tmp_path.iterdir())


def test_onnx_without_onnxscript_uses_the_torchscript_exporter(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    r = export_backbone(tiny(), tmp_path / "b.onnx", "onnx", input_size=32)
    assert r.max_abs_diff < TOL


def test_onnx_without_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    with pytest.raises(ExportError, match=r"onnxruntime: pip install 'bcssl\[export\]'"):
        export_backbone(tiny(), tmp_path / "b.onnx", "onnx", input_size=32)


def test_load_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    with pytest.raises(ExportError, match="not an export file"):
        load_backbone(tmp_path / "junk.bin")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ExportError, match="not a bcssl export"):
        load_backbone(tmp_path / "foreign.safetensors")
    with pytest.raises(ExportError, match="unknown export format"):
        export_backbone(tiny(), tmp_path / "x", "tflite")
    with pytest.raises(ExportError, match="too small"):
        export_backbone(tiny(), tmp_path / "x", "safetensors", input_size=16)


# --- a run: `bcssl export` and load_backbone(run_dir) ----------------------------------------------


def make_run(tmp_path, data_root, *overrides):
    """A run directory with a checkpoint whose teacher has non-trivial BN stats (no training needed)."""
    from bcssl.engine import checkpoint as ckpt
    from bcssl.engine.run_dir import run_dir_of, save_config
    from bcssl.engine.runtime import build_method

    cfg = tiny_config(tmp_path, data_root, *overrides)
    run = run_dir_of(cfg)
    run.mkdir(parents=True)
    save_config(cfg, run)
    method = build_method(cfg)
    randomise(method.eval_backbone())
    ckpt.save({"method": method.state_dict(), "step": 7}, run / "checkpoint.pt")
    return run


@pytest.fixture
def tiny_run(tmp_path, tiny_fmnist):
    return make_run(tmp_path, tiny_fmnist)  # bcssl_atto 8..64, stem_stride 2, kernel 3, bn+ln


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_export_run_json_and_load_backbone(tiny_run, capsys):
    assert main(["export", str(tiny_run), "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["format"] == "safetensors" and r["path"] == str(tiny_run / "export" / "backbone.safetensors")
    assert r["max_abs_diff"] < TOL and r["input_size"] == 32 and r["model"] == "bcssl_atto"

    from_file, from_run = bcssl.load_backbone(r["path"]), bcssl.load_backbone(tiny_run)
    meta = from_file.bcssl_metadata
    assert json.loads(meta["mean"]) == [0.5] * 3 and meta["step"] == "7" and meta["method"] == "dino"
    assert not from_file.training and not from_run.training
    x = torch.randn(3, 3, 32, 32)
    assert from_file(x).shape == (3, 64) and max_diff(from_file, from_run, x) < TOL

    out = tiny_run / "ts" / "model.pt"
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out), "--size", "48", "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["path"] == str(out) and r["input_size"] == 48 and r["max_abs_diff"] < TOL
    assert max_diff(from_run, load_backbone(out), x) < TOL


def test_cli_export_errors_are_one_line(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--format", "timm"]) == 1  # stem_stride=2: not a timm ConvNeXt
    err = capsys.readouterr().err
    assert "stem_stride=2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tiny_run / "export").exists() or not any((tiny_run / "export").iterdir())
    assert main(["export", str(tmp_path / "missing")]) == 1
    assert "not a bcssl run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown format
        main(["export", str(tiny_run), "--format", "tflite"])


# --- hf: timm's model folder (config.json + model.safetensors + model card) ------------------------
HF_TWINS = {  # every backbone with a timm twin, tiny; the exported folder must give its features
    "bcssl_bn+ln_k9": lambda: tiny(),
    "bcssl_ln_k5_stem1": lambda: tiny(kernel_size=5, dw_norm="ln", stem_stride=1),
    "convnext_t": lambda: create_backbone("convnext_t", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "resnet50": lambda: create_backbone("resnet50", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "vit_s16": lambda: create_backbone("vit_s16", depths=2, dims=64, img_size=32),
    "swin_t": lambda: create_backbone("swin_t", depths=(1, 2, 1, 2), dims=(8, 16, 32, 64), img_size=32),
}


@pytest.mark.parametrize("name", list(HF_TWINS))
def test_hf_folder_loads_with_timm_local_dir(tmp_path, name):
    import timm

    m = HF_TWINS[name]()
    randomise(m)
    r = export_backbone(m, tmp_path / "hf", "hf", input_size=32, metadata={"method": "dino", "mean": [0.5] * 3,
                                                                           "std": [0.25] * 3})
    assert r.max_abs_diff < 1e-5 and sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    net = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()  # strict load
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(net, m.eval(), x) < 1e-5
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architecture"] == r.timm_model and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    assert cfg["pretrained_cfg"]["tag"] == "bcssl_dino" and not list(tmp_path.glob(".hf*"))


@pytest.mark.parametrize("make,match", [
    (lambda: tiny(dw_norm="bn"), "dw_norm='bn'"),
    (lambda: tiny(stem_stride=2), "stem_stride=2"),
    (lambda: create_backbone("vit_s16_mocov3", depths=1, dims=64, img_size=32), "no timm twin"),
])
def test_hf_refuses_backbones_without_a_timm_twin(tmp_path, make, match):
    with pytest.raises(ExportError, match=match):
        export_backbone(make(), tmp_path / "hf", "hf", input_size=32)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_cli_hf_export_of_a_run_has_a_model_card(tmp_path, tiny_fmnist, capsys):
    from bcssl.engine.run_dir import write_json

    run = make_run(tmp_path, tiny_fmnist, "model.stem_stride=4", "model.kernel_size=9")
    write_json(run / "knn.json", {"knn_top1": 81.25, "knn_top5": 97.5})
    assert main(["export", str(run), "--format", "hf", "--json"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["path"] == str(run / "export" / "hf") and r["max_abs_diff"] < 1e-5
    card = (run / "export" / "hf" / "README.md").read_text()
    assert "| knn_top1 | 81.25 |" in card and "method: dino" in card and "fashion_mnist" in card
    assert 'timm.create_model("local-dir:PATH", pretrained=True)' in card
    assert main(["export", str(run), "--format", "hf", "--json"]) == 0  # again: replaces the folder
    assert sorted(p.name for p in (run / "export").iterdir()) == ["hf"]
