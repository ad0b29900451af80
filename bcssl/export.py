"""Export a backbone for downstream use, with every BatchNorm folded into its depthwise conv.

``bcssl export RUN --format F`` (:func:`export_run`) writes the run's eval backbone (the DINO
teacher, ...) under ``RUN/export/``:

==============  ============================  =====================================================
format          default file                  what it is
==============  ============================  =====================================================
``safetensors`` ``backbone.safetensors``      folded state dict; its metadata names the architecture
                                              and its kwargs, so :func:`load_backbone` rebuilds the
                                              model without the run directory
``torchscript`` ``backbone.torchscript.pt``   ``torch.jit.trace`` of the folded model;
                                              ``torch.jit.load`` it anywhere, bcssl not needed
``onnx``        ``backbone.onnx``             input ``input`` (B, C, H, W) float32 with dynamic batch,
                                              height and width; output ``features`` (B, D). Needs
                                              ``pip install 'bcssl[export]'`` (onnx, onnxscript,
                                              onnxruntime)
``timm``        ``backbone_timm.safetensors`` a timm ConvNeXt state dict: with ``meta`` its
                                              safetensors metadata, ``timm.create_model(
                                              meta['timm_model'], pretrained=False,
                                              **json.loads(meta['timm_kwargs']))`` loads it strictly
                                              (e.g. ``convnext_tiny, kernel_sizes=9, num_classes=0``)
``hf``          ``hf/`` (a folder)            timm's model folder, the layout the Hugging Face hub
                                              serves: ``config.json`` (architecture, ``model_args``,
                                              ``pretrained_cfg`` with the run's mean/std),
                                              ``model.safetensors`` and a ``README.md`` model card
                                              (method, data, length, the run's evaluation results);
                                              ``timm.create_model("local-dir:PATH", pretrained=True)``
                                              loads it strictly; upload it with ``huggingface-cli
                                              upload``. For backbones with a timm twin: BC-SSL with
                                              ``dw_norm`` ``bn+ln``/``ln`` and stem stride 4 (or 1),
                                              ``convnext_t``, ``resnet50``, ``vit_s16``, ``swin_t``
==============  ============================  =====================================================

Once its BN is folded, a BC-SSL ConvNeXt with ``dw_norm='bn+ln'`` (or ``'ln'``) *is* timm's
ConvNeXt with ``kernel_sizes=k``. Not expressible in timm (a clear :class:`ExportError`):
``dw_norm='bn'`` (no LayerNorm in the blocks), ``stem_stride=2`` (timm's ``patch_size=2`` adds a
stride-2 downsampling to stage 0) and, for the ``timm`` file format, non-ConvNeXt baselines
(resnet50, vit_s16, swin_t: the ``hf`` folder carries them, since they are timm models already).

Every export is verified before it is kept: the written file is loaded back, a random batch goes
through it and through the *unfolded* eval-mode backbone, and the max abs difference must be at
most ``tolerance`` (1e-4); otherwise nothing is written and :class:`ExportError` says by how much
it failed. Files are written under a temporary name and renamed once verified.

:func:`load_backbone` turns any of these files, or a run directory, into a ready feature
extractor: eval mode, ``model(x) -> (B, num_features)`` pooled features; the export metadata
(input size, normalisation mean/std, source run ...) is in ``model.bcssl_metadata``. Inputs are
preprocessed as in evaluation (``bcssl.eval.features.eval_preprocess``: [0, 1] pixels, centre
crop or resize to ``input_size``, then ``(x - mean) / std``). Nothing is ever unpickled:
safetensors files are read with ``safetensors``; TorchScript archives with ``torch.jit.load``
(TorchScript code, not pickled Python -- still, load only files you trust); ONNX files run in an
onnxruntime session (:class:`OnnxBackbone`, CPU by default).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("safetensors", "torchscript", "onnx", "timm", "hf")
DEFAULT_NAMES = {
    "safetensors": "backbone.safetensors",
    "torchscript": "backbone.torchscript.pt",
    "onnx": "backbone.onnx",
    "timm": "backbone_timm.safetensors",
    "hf": "hf",  # a folder
}
TOLERANCE = 1e-4
BCSSL_TAG = "bcssl.backbone/1"  # metadata "format" of a bcssl safetensors export
TIMM_TAG = "bcssl.timm/1"  # metadata "format" of a timm-format export
BCSSL_CLASS = "BCSSLConvNeXt"  # metadata "model" meaning "rebuild with BCSSLConvNeXt(**model_kwargs)"
ONNX_OPSET = 18
_INSTALL_HINT = "pip install 'bcssl[export]'"

# (depths, dims) -> (timm model name, whether timm builds it with 1x1-conv MLPs)
_TIMM_CONVNEXTS: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[str, bool]] = {
    ((2, 2, 6, 2), (40, 80, 160, 320)): ("convnext_atto", True),
    ((2, 2, 6, 2), (48, 96, 192, 384)): ("convnext_femto", True),
    ((2, 2, 6, 2), (64, 128, 256, 512)): ("convnext_pico", True),
    ((2, 2, 8, 2), (80, 160, 320, 640)): ("convnext_nano", True),
    ((3, 3, 9, 3), (96, 192, 384, 768)): ("convnext_tiny", False),
    ((3, 3, 27, 3), (96, 192, 384, 768)): ("convnext_small", False),
}


class ExportError(ValueError):
    """A backbone / format combination that cannot be exported, a missing optional dependency, an
    unreadable export file, or an export whose outputs differ from the backbone's."""


@dataclass
class ExportResult:
    """What :func:`export_backbone` wrote and how well it matched."""

    path: Path
    format: str
    max_abs_diff: float
    input_size: int
    model: str
    tolerance: float = TOLERANCE
    timm_model: str | None = None
    timm_kwargs: dict | None = None
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"path": str(self.path), "format": self.format, "max_abs_diff": self.max_abs_diff,
             "tolerance": self.tolerance, "input_size": self.input_size, "model": self.model}
        if self.timm_model is not None:
            d["timm_model"], d["timm_kwargs"] = self.timm_model, self.timm_kwargs
        return d


# ------------------------------------------------------------------------------------------------
# architecture specs
# ------------------------------------------------------------------------------------------------


def config_model_kwargs(model_cfg) -> dict:
    """The run's backbone kwargs (as the methods build it, :func:`backbone_kwargs`) for inference
    (no drop path), with lists for the JSON metadata."""
    from bcssl.methods.base import backbone_kwargs

    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in backbone_kwargs(model_cfg, drop_path_rate=0.0).items()}


def _build(model: str, kwargs: dict) -> nn.Module:
    from bcssl.models import BCSSLConvNeXt, create_backbone

    if model == BCSSL_CLASS:
        return BCSSLConvNeXt(**kwargs)
    return create_backbone(model, **kwargs)


def timm_convnext_spec(depths: Sequence[int], dims: Sequence[int], kernel_sizes: Sequence[int], *,
                       stem_stride: int = 4, in_chans: int = 3) -> tuple[str, dict, bool]:
    """``(timm model name, create_model kwargs, conv_mlp)`` of the timm ConvNeXt with this shape.

    The name is the matching timm size (convnext_atto ... convnext_small) or ``convnext_tiny``
    with explicit ``depths``/``dims``; ``conv_mlp`` says whether that timm model stores its MLP as
    1x1 convs (atto..nano). Raises :class:`ExportError` for ``stem_stride=2``.
    """
    depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
    ks = tuple(int(k) for k in kernel_sizes)
    if stem_stride == 2:
        raise ExportError("stem_stride=2 cannot be expressed as a timm ConvNeXt (timm's patch_size=2 adds a "
                          "stride-2 downsampling to stage 0); export it as safetensors, torchscript or onnx")
    if stem_stride not in (1, 4):
        raise ExportError(f"stem_stride={stem_stride} cannot be expressed as a timm ConvNeXt")
    name, conv_mlp = _TIMM_CONVNEXTS.get((depths, dims), ("convnext_tiny", False))
    kw: dict[str, Any] = {}
    if (depths, dims) not in _TIMM_CONVNEXTS:
        kw["depths"], kw["dims"] = list(depths), list(dims)
    kw["kernel_sizes"] = ks[0] if len(set(ks)) == 1 else list(ks)
    # No layer scale: timm.create_model drops None kwargs, so ls_init_value=None cannot be passed;
    # the state dict gets gamma = 1 instead (see _timm_state), which is exactly the same function.
    if stem_stride == 1:
        kw["patch_size"] = 1  # 1x1 stem, no stage-0 downsampling: BC-SSL's stem_stride=1 exactly
    if in_chans != 3:
        kw["in_chans"] = int(in_chans)
    kw["num_classes"] = 0
    return name, kw, conv_mlp


def _timm_state(backbone: nn.Module) -> tuple[dict, str, dict]:
    """timm ConvNeXt ``(state dict, model name, kwargs)`` of a backbone (its BN folded)."""
    what = getattr(backbone, "name", type(backbone).__name__)
    try:
        layout = backbone.timm_convnext()
    except ValueError as e:
        raise ExportError(f"{e}; export it as safetensors, torchscript or onnx") from None
    if layout is None:
        raise ExportError(f"the timm format is for ConvNeXt backbones (bcssl_*, convnext_t), not {what}; "
                          "export it as safetensors, torchscript or onnx")
    name, kw, conv_mlp = timm_convnext_spec(layout.depths, layout.dims, layout.kernel_sizes,
                                            stem_stride=layout.stem_stride, in_chans=layout.in_chans)
    state = layout.state_dict
    out = {}
    for k, v in state.items():
        if k.endswith((".mlp.fc1.weight", ".mlp.fc2.weight")):
            v = v.reshape(*v.shape[:2], 1, 1) if conv_mlp else v.reshape(v.shape[0], -1)
        out[k] = v
        if k.endswith(".conv_dw.bias") and k.replace(".conv_dw.bias", ".gamma") not in state:
            out[k.replace(".conv_dw.bias", ".gamma")] = torch.ones_like(v)  # no layer scale == scale 1
    return out, name, kw


def _timm_twin(folded: nn.Module) -> nn.Module:
    """The timm model that computes what the folded backbone computes, with its weights: a ConvNeXt
    layout (:func:`_timm_state`) built by ``timm.create_model``, or the timm model a baseline wraps."""
    what = getattr(folded, "name", type(folded).__name__)
    try:
        layout = folded.timm_convnext()
    except ValueError as e:
        raise ExportError(f"{e}; export it as safetensors, torchscript or onnx") from None
    if layout is not None:
        state, name, kw = _timm_state(folded)
        net = _create_timm(name, kw)
        net.load_state_dict(state, strict=True)
        return net.eval()
    inner = getattr(folded, "model", None)
    if inner is not None and getattr(inner, "pretrained_cfg", None) and hasattr(inner, "forward_head"):
        return inner.eval()  # a timm.create_model model: timm records its factory arguments
    raise ExportError(f"{what} has no timm twin that timm.create_model can rebuild (it is built outside timm's "
                      "registry); export it as safetensors, torchscript or onnx")


def _model_card(meta: dict, architecture: str, model_args: dict) -> str:
    """README.md of an ``hf`` export: what the weights are, how they were made, how to load them."""
    res = meta.get("results") or {}
    rows = [f"| {k} | {v} |" for k, v in res.items()]
    mean, std = meta.get("mean"), meta.get("std")
    lines = [
        "---", "library_name: timm", "tags:", "- image-feature-extraction", "- self-supervised", "- bcssl",
        f"- {meta.get('method', 'ssl')}", "---", "",
        f"# {meta.get('variant', architecture)} pre-trained with {meta.get('method', '?')} (bcssl)", "",
        f"Backbone weights from a bcssl run, exported with `bcssl export RUN --format hf` (bcssl "
        f"{meta.get('bcssl_version', '?')}): timm `{architecture}` with `{json.dumps(model_args)}`, every "
        "BatchNorm after a depthwise conv folded into it. The model returns pooled features (no classifier).", "",
        "## Pre-training", "",
        f"- method: {meta.get('method', '?')} (network: {meta.get('encoder', '?')})",
        f"- data: {meta.get('data', '?')}",
        f"- length: {meta.get('epochs', '?')} epochs, checkpoint step {meta.get('step', '?')}",
        f"- input: {meta.get('input_size', '?')} px, normalised with mean {mean} and std {std}", "",
        "## Results of the run", "",
        *(["| evaluation | value |", "|---|---|", *rows] if rows else ["No evaluation was run before the export."]), "",
        "## Use", "", "```python", "import timm", "",
        "model = timm.create_model(\"local-dir:PATH\", pretrained=True).eval()   # or \"hf-hub:USER/REPO\"",
        "features = model(images)   # (B, num_features)", "```", "",
        "Preprocess as the run evaluated: pixels in [0, 1], resize and centre-crop to the input size, then "
        "`(x - mean) / std` (`timm.data.resolve_data_config({}, model=model)` reads them from config.json).", ""]
    return "\n".join(lines)


def _save_hf(folded: nn.Module, out_dir: Path, meta: dict) -> nn.Module:
    """Write the ``hf`` folder (``config.json``, ``model.safetensors``, ``README.md``); returns it loaded
    back with ``timm.create_model("local-dir:...", pretrained=True)``."""
    import timm
    from timm.models import save_for_hf

    twin = _timm_twin(folded)
    size = int(meta["input_size"])
    pretrained_cfg = {"tag": f"bcssl_{meta.get('method', 'ssl')}", "license": None, "source": None,
                      "input_size": [int(meta.get("in_chans", 3)), size, size]}
    if meta.get("mean") is not None:
        pretrained_cfg.update(mean=list(meta["mean"]), std=list(meta["std"]))
    out_dir.mkdir(parents=True)
    # "bcssl": the export metadata (as a safetensors export's), which load_backbone attaches; timm ignores it
    bcssl_meta = _str_meta({k: v for k, v in meta.items() if k != "results"})
    save_for_hf(twin, str(out_dir), model_config={"pretrained_cfg": pretrained_cfg, "bcssl": bcssl_meta},
                safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    (out_dir / "README.md").write_text(_model_card(meta, cfg["architecture"], cfg.get("model_args", {})))
    return timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()


def _create_timm(name: str, kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


# ------------------------------------------------------------------------------------------------
# writers and loaders
# ------------------------------------------------------------------------------------------------


def _str_meta(meta: dict) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _save_safetensors(state: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    # clone: a state dict may share storage between entries, which safetensors refuses
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata=_str_meta(meta))


def _read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception as e:  # a truncated or foreign file
        raise ExportError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from e


def _load_bcssl_safetensors(path: Path, state: dict, meta: dict) -> nn.Module:
    try:
        model, kwargs = meta["model"], json.loads(meta["model_kwargs"])
    except (KeyError, ValueError) as e:
        raise ExportError(f"{path} has no usable architecture metadata ({e}); re-export it with `bcssl export`") from e
    net = _build(model, kwargs).fold_bn() if meta.get("bn_folded") == "true" else _build(model, kwargs)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _load_timm_safetensors(path: Path, state: dict, meta: dict) -> nn.Module:
    try:
        name, kwargs = meta["timm_model"], json.loads(meta["timm_kwargs"])
    except (KeyError, ValueError) as e:
        raise ExportError(f"{path} has no usable timm metadata ({e}); re-export it with `bcssl export`") from e
    net = _create_timm(name, kwargs)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _trace(folded: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():  # TracerWarnings about the Python input-size check; deprecation notes
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.trace(folded, (x,), check_trace=False)


def _save_torchscript(folded: nn.Module, x: torch.Tensor, path: Path, meta: dict) -> None:
    traced = _trace(folded, x)
    with warnings.catch_warnings():  # torch.jit.save is deprecated in torch 2.14 but works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(path), _extra_files={"bcssl_metadata.json": json.dumps(_str_meta(meta))})


def _load_torchscript(path: Path, device="cpu") -> nn.Module:
    extra = {"bcssl_metadata.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:
        raise ExportError(f"{path} is not a TorchScript archive ({type(e).__name__}); for a training checkpoint "
                          "pass its run directory instead") from e
    meta = json.loads(extra["bcssl_metadata.json"] or "{}")
    _attach(net, meta)
    return net.eval()


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"the onnx format needs {' and '.join(missing)}: {_INSTALL_HINT}")


def _save_onnx(folded: nn.Module, x: torch.Tensor, path: Path, meta: dict, min_size: int) -> None:
    """torch's dynamo exporter (needs onnxscript) with dynamic batch/height/width; the TorchScript-based
    exporter when onnxscript is missing or the dynamo export fails. Metadata -> ``metadata_props``."""
    import onnx

    names = {"input_names": ["input"], "output_names": ["features"]}
    err: Exception | None = None
    if importlib.util.find_spec("onnxscript") is not None:
        Dim = torch.export.Dim
        shapes = ({0: Dim("batch"), 2: Dim("height", min=max(2, min_size)), 3: Dim("width", min=max(2, min_size))},)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(folded, (x,), None, dynamo=True, verbose=False, dynamic_shapes=shapes,
                                            opset_version=ONNX_OPSET, **names)
            program.save(str(path), external_data=False)
        except Exception as e:  # noqa: BLE001  fall back to the TorchScript-based exporter below
            err = e
    if err is not None or not path.exists():
        if err is not None:
            warnings.warn(f"dynamo ONNX export failed ({type(err).__name__}: {str(err)[:200]}); "
                          "using the TorchScript-based exporter", stacklevel=3)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(folded, (x,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}},
                              **names)
    model = onnx.load(str(path))
    for k, v in _str_meta(meta).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = k, v
    onnx.save(model, str(path))


class OnnxBackbone(nn.Module):
    """An exported ONNX backbone behind the ``nn.Module`` call: ``forward(x) -> (B, num_features)``.

    Runs an onnxruntime session (``providers`` default ``['CPUExecutionProvider']``) on
    ``x.float()`` moved to the CPU; the result comes back on ``x``'s device. No autograd.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None):
        super().__init__()
        _require_onnx()
        import onnxruntime as ort

        self.path = str(path)
        try:
            self.session = ort.InferenceSession(self.path, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            raise ExportError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]})") from e
        self.input_name = self.session.get_inputs()[0].name
        _attach(self, dict(self.session.get_modelmeta().custom_metadata_map))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def _attach(net: nn.Module, meta: dict) -> None:
    """``net.bcssl_metadata`` (dict of str) and ``net.num_features`` when known."""
    try:
        net.bcssl_metadata = dict(meta)
        if "num_features" in meta and not hasattr(net, "num_features"):
            net.num_features = int(meta["num_features"])
    except (AttributeError, RuntimeError, TypeError):  # some ScriptModules refuse new attributes
        pass


def _sniff(path: Path) -> str:
    """Format of an export file from its first bytes (zip: TorchScript; JSON header: safetensors;
    ONNX: the ``.onnx`` suffix or a protobuf starting with ``ir_version``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torchscript"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if path.name.lower().endswith(".onnx") or head[:1] == b"\x08":  # ModelProto starts with ir_version
        return "onnx"
    raise ExportError(f"{path} is not an export file (expected one written by `bcssl export`: safetensors, "
                      "TorchScript or ONNX) nor a run directory")


def _load_file(path: Path, fmt: str | None = None, device="cpu") -> nn.Module:
    """Load an export file; ``fmt`` forces the format, otherwise it comes from the name/metadata."""
    if fmt is None:
        fmt = _sniff(path)
    if fmt == "onnx":
        return OnnxBackbone(path)
    if fmt == "torchscript":
        return _load_torchscript(path, device)
    state, meta = _read_safetensors(path)
    tag = meta.get("format")
    if tag == BCSSL_TAG:
        net = _load_bcssl_safetensors(path, state, meta)
    elif tag == TIMM_TAG:
        net = _load_timm_safetensors(path, state, meta)
    else:
        raise ExportError(f"{path} is not a bcssl export (metadata format {tag!r}); create one with `bcssl export`")
    _attach(net, meta)
    return net.to(device).eval()


def load_backbone(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """A ready feature extractor from an export file or a run directory.

    - ``*.safetensors`` from ``--format safetensors``: the bcssl model rebuilt from the metadata,
      BN folded; from ``--format timm``: the timm model (``timm.create_model``, ``num_classes=0``).
    - ``*.torchscript.pt`` (any ``.pt``/``.pth``): ``torch.jit.load``.
    - ``*.onnx``: an :class:`OnnxBackbone` (onnxruntime on the CPU; ``device`` is ignored).
    - an ``hf`` export folder (``config.json`` + ``model.safetensors``): the timm model.
    - a run directory: its eval backbone from the latest checkpoint, BN folded.

    Always eval mode; ``model(x)`` gives pooled features ``(B, num_features)``. Export metadata
    (``input_size``, ``mean``, ``std``, ``source_run`` ...) is in ``model.bcssl_metadata``.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return _load_hf(p, device)
    if p.is_dir():
        from bcssl.engine.runtime import load_run

        r = load_run(p)
        net = r.backbone.fold_bn()
        _attach(net, _str_meta(_run_metadata(p, r)))
        return net.to(device).eval()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected an export file from `bcssl export` or a run directory)")
    return _load_file(p, device=device)


def _load_hf(folder: Path, device="cpu") -> nn.Module:
    """An ``hf`` export folder through ``timm.create_model("local-dir:...", pretrained=True)``."""
    import timm

    try:
        meta = json.loads((folder / "config.json").read_text()).get("bcssl") or {}
        net = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as e:  # a foreign or damaged folder
        raise ExportError(f"{folder} is not a loadable timm model folder ({type(e).__name__}: {str(e)[:200]})") from e
    _attach(net, meta)
    return net.to(device).eval()


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def _probe(in_chans: int, size: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, size, size, generator=g)


def _bcssl_version() -> str:
    try:
        from importlib.metadata import version

        return version("bcssl")
    except Exception:  # noqa: BLE001  running from a source tree
        return "unknown"


@torch.no_grad()
def export_backbone(backbone: nn.Module, out: str | os.PathLike, fmt: str = "safetensors", *,
                    model_name: str | None = None, model_kwargs: dict | None = None, input_size: int = 224,
                    metadata: dict | None = None, tolerance: float = TOLERANCE) -> ExportResult:
    """Fold ``backbone``'s BN, write it as ``fmt`` to ``out``, load it back and check it.

    ``model_name``/``model_kwargs``: the ``create_backbone`` call that rebuilds the architecture
    (needed for the safetensors format of a backbone whose ``architecture()`` is ``None``; a
    ``BCSSLConvNeXt`` describes itself). ``input_size``: side of the square example input used for
    tracing and the check (the export itself takes any size the model takes: batch, height and
    width stay dynamic).
    ``metadata``: extra entries for the file (values JSON-encoded unless str).

    The check runs a random batch through the written file and the unfolded ``backbone`` in eval
    mode; a max abs difference above ``tolerance`` raises :class:`ExportError` and leaves nothing
    at ``out``. ``backbone`` itself is not modified (its train/eval mode is restored).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    min_size = int(backbone.min_input_size)
    if not isinstance(input_size, int) or input_size < min_size:
        raise ExportError(f"input size {input_size!r} is too small for this backbone: need at least {min_size}")
    arch = backbone.architecture()  # a model that describes itself (BCSSLConvNeXt); else the caller's
    model, kwargs = arch if arch is not None else (model_name, dict(model_kwargs or {}))
    if fmt == "safetensors" and model is None:
        raise ExportError(f"the safetensors format needs model_name/model_kwargs to rebuild a "
                          f"{type(backbone).__name__}; or use torchscript/onnx")

    was_training = backbone.training
    backbone.eval()
    try:
        folded = backbone.fold_bn().cpu().float()  # exports are float32 CPU models
        in_chans = int(backbone.in_chans)
        x_trace = _probe(in_chans, input_size, batch=2, seed=1)
        x_check = _probe(in_chans, input_size, batch=3, seed=0)  # another batch size than traced
        param = next(backbone.parameters(), None)
        ref = backbone(x_check.to(param.device, param.dtype) if param is not None else x_check).float().cpu()
    finally:
        backbone.train(was_training)

    meta: dict[str, Any] = {"format": BCSSL_TAG if fmt != "timm" else TIMM_TAG, "bcssl_version": _bcssl_version(),
                            "bn_folded": "true", "input_size": int(input_size), "in_chans": in_chans,
                            "num_features": int(ref.shape[1])}
    if model is not None:
        meta["model"], meta["model_kwargs"] = model, kwargs
    meta.update(metadata or {})
    timm_name = timm_kwargs = None
    if fmt == "timm":
        timm_state, timm_name, timm_kwargs = _timm_state(folded)
        meta["timm_model"], meta["timm_kwargs"] = timm_name, timm_kwargs

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    _discard(tmp)
    try:
        if fmt == "safetensors":
            _save_safetensors(folded.state_dict(), tmp, meta)
            loaded = _load_file(tmp, "safetensors")
        elif fmt == "timm":
            _save_safetensors(timm_state, tmp, meta)
            loaded = _load_file(tmp, "safetensors")
        elif fmt == "hf":  # a folder, loaded back with timm.create_model("local-dir:...")
            loaded = _save_hf(folded, tmp, meta)
            hf_config = json.loads((tmp / "config.json").read_text())
            timm_name, timm_kwargs = hf_config["architecture"], hf_config.get("model_args")
        elif fmt == "torchscript":
            _save_torchscript(folded, x_trace, tmp, meta)
            loaded = _load_file(tmp, "torchscript")
        else:
            _save_onnx(folded, x_trace, tmp, meta, min_size)
            loaded = _load_file(tmp, "onnx")
        got = loaded(x_check).float()
        if got.shape != ref.shape:
            raise ExportError(f"verification failed: the {fmt} export gives shape {tuple(got.shape)}, "
                              f"the backbone {tuple(ref.shape)}; nothing written")
        diff = float((got - ref).abs().max())
        if not diff <= tolerance:  # also catches NaN
            raise ExportError(f"verification failed: the {fmt} export differs from the unfolded backbone by "
                              f"{diff:.3g} > {tolerance:g}; nothing written")
        del loaded  # release the file (onnxruntime session) before renaming
        _put(tmp, out)
    finally:
        _discard(tmp)
    shown = str(meta.get("variant") or model or getattr(backbone, "name", type(backbone).__name__))
    return ExportResult(out, fmt, diff, int(input_size), shown, tolerance, timm_name, timm_kwargs,
                        _str_meta({k: v for k, v in meta.items() if k != "results"}))


def _discard(path: Path) -> None:
    """Remove a temporary export: a file, or an ``hf`` folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put(tmp: Path, out: Path) -> None:
    """Rename the verified ``tmp`` to ``out``, replacing an older export (a file, or an ``hf`` folder,
    which ``os.replace`` cannot overwrite: it is moved aside first, then removed)."""
    if tmp.is_dir() and out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        _discard(old)
    else:
        os.replace(tmp, out)


def _run_results(run: Path) -> dict:
    """The run's evaluation results for a model card: k-NN, linear probe, mean corruption error."""
    out = {}
    for file, keys in (("knn.json", ("knn_top1", "knn_top5")), ("linear.json", ("linear_top1", "linear_protocol")),
                       ("robustness.json", ("mce", "mean_error"))):
        try:
            data = json.loads((run / file).read_text())
        except (OSError, ValueError):
            continue
        out.update({k: data[k] for k in keys if data.get(k) is not None})
    return out


def _run_metadata(run: Path, loaded) -> dict:
    cfg = loaded.cfg
    return {"variant": str(cfg.model.name), "method": str(cfg.method.name), "source_run": str(run.resolve()),
            "checkpoint": loaded.checkpoint_path.name, "checkpoint_sha256": loaded.checkpoint_sha256,
            "encoder": loaded.encoder,
            "step": loaded.step, "input_size": int(cfg.crops.global_size),
            "mean": [float(v) for v in cfg.crops.mean], "std": [float(v) for v in cfg.crops.std]}


def export_run(run_dir: str | os.PathLike, fmt: str = "safetensors", out: str | os.PathLike | None = None, *,
               input_size: int | None = None, tolerance: float = TOLERANCE) -> ExportResult:
    """Export a run's eval backbone (latest checkpoint) as ``fmt`` (see the module docstring).

    ``out``: a file, or a folder for the default name; default ``<run_dir>/export/<name>``.
    ``input_size``: example/check input side, default the run's ``crops.global_size``.
    """
    from bcssl.engine.runtime import load_run

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run_dir)
    loaded = load_run(run)
    meta = _run_metadata(run, loaded)
    if fmt == "hf":  # the model card's facts
        cfg = loaded.cfg
        meta.update(data=str(cfg.data.name) + (f" ({cfg.data.root})" if cfg.data.get("root") else ""),
                    epochs=int(cfg.train.epochs) if not cfg.train.get("steps") else f"{cfg.train.steps} steps",
                    results=_run_results(run))
    size = int(input_size) if input_size is not None else meta["input_size"]
    meta["input_size"] = size
    target = Path(out) if out is not None else run / "export"
    if fmt == "hf":  # a folder: --out names it
        target = target if out is not None else target / DEFAULT_NAMES[fmt]
    elif out is None or target.is_dir() or str(out).endswith(os.sep):
        target = target / DEFAULT_NAMES[fmt]
    return export_backbone(loaded.backbone, target, fmt, model_name=str(loaded.cfg.model.name),
                           model_kwargs=config_model_kwargs(loaded.cfg.model), input_size=size,
                           metadata=meta, tolerance=tolerance)
