"""Load a run configuration: schema defaults <- preset/YAML (with ``_base_`` inheritance) <- overrides."""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcssl.config.schema import AMP_MODES, LOG_BACKENDS, METHOD_SECTIONS, Config, MethodConfig, ModelConfig

_DEFAULT_METHOD = MethodConfig().name

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says what to change."""


#: Keys bcssl no longer has, with what replaced them. A YAML file that has one (the config.yaml of
#: a run made by an older bcssl) loads without it, with one log line; an override naming one is an error.
RETIRED_KEYS = {
    "data.load_size": "pre-training crops come from the whole image now, and the evaluation's Resize + "
                      "CenterCrop of image folders are eval.data.resize_size / eval.data.crop_size",
}

log = logging.getLogger("bcssl")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (``demo_fmnist``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name_or_path, list_presets(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown preset '{name_or_path}'.{hint} Presets: {', '.join(list_presets())} "
        "(or pass a path to a .yaml file)"
    )


def _flat_keys(d: dict, prefix: str = "") -> Iterable[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flat_keys(v, key + ".")
        else:
            yield key


_VALID_KEYS: list[str] | None = None

_DINO_KEYS = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "norm_last_layer", "use_bn_in_head",
              "student_temp", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs",
              "center_momentum", "freeze_last_layer")
#: keys of the flat ``method`` section (and one model key) before each method had its own section:
#: old key -> new key, or {method.name: new key} for keys several methods shared
RENAMED_KEYS: dict[str, str | dict[str, str]] = {
    **{f"method.{k}": f"method.dino.{k}" for k in _DINO_KEYS},
    "method.momentum_teacher": {"dino": "method.dino.momentum_teacher", "byol": "method.byol.momentum",
                                "moco_v3": "method.moco_v3.momentum", "care": "method.care.momentum"},
    **{f"method.{k}": {m: f"method.{m}.{k}" for m in ("byol", "moco_v3", "care")}
       for k in ("proj_hidden_dim", "proj_dim")},
    "method.care_blocks": "method.care.blocks",
    "method.care_heads": "method.care.heads",
    "method.care_pos_size": "method.care.fmap_size",
    "method.care_lambda": "method.care.lambda_fea",
    "method.moco_proj_layers": "method.moco_v3.proj_layers",
    "method.moco_temperature": "method.moco_v3.temperature",
    "model.random_patch_projection": "method.moco_v3.stop_grad_conv1",
}


def _renamed(key: str, method: str) -> str | None:
    """The new name of an old key (for ``method``, where several methods shared it)."""
    new = RENAMED_KEYS.get(key)
    if isinstance(new, dict):
        return new.get(method) or " / ".join(new.values())
    return new


def valid_keys() -> list[str]:
    global _VALID_KEYS
    if _VALID_KEYS is None:
        schema = OmegaConf.to_container(OmegaConf.structured(Config))
        # Optional list fields (model.depths) are None in the schema, so they are leaves already.
        _VALID_KEYS = sorted(_flat_keys(schema))
    return _VALID_KEYS


def _check_keys(keys: Iterable[str], source: str) -> None:
    valid = set(valid_keys())
    for key in keys:
        if key in valid:
            continue
        close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}.{hint}")


#: keys that moved to another section: old key -> (new key, old value -> {new key: value}).
#: A YAML file with an old key (a run saved by an older bcssl) is read as the new one, with one log
#: line; an old key on the command line is an error naming the new one.
MOVED_KEYS = {
    "eval.robustness_limit": ("robustness.corruption_limit", lambda v: {"robustness.corruption_limit": v}),
    "eval.imagenet_c": ("robustness.folder", lambda v: (
        {"robustness.folder": v, "robustness.kind": "imagenet_c"} if v else {})),
    "linear.augment": ("linear.protocol", lambda v: (
        {"linear.protocol": "dino_eval_linear" if v else "cached_features"})),
    "log.tensorboard": ("log.backends", lambda v: {"log.backends": ["tensorboard", "csv"] if v else ["csv"]}),
}


def _pop_dotted(d: dict, dotted: str):
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _set_dotted(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def _migrate(layer: dict, source: str, method: str, command_line: bool = False) -> dict:
    """Read the keys of older bcssl versions in ``layer`` (:data:`RETIRED_KEYS`, :data:`MOVED_KEYS`,
    :data:`RENAMED_KEYS`; ``method``: the run's method.name, for keys several methods shared). In a
    file each is read as its new key with one log line; on the command line each is an error."""
    for key, why in RETIRED_KEYS.items():
        found, _ = _pop_dotted(layer, key)
        if found and command_line:
            raise ConfigError(f"{key} was retired: {why}")
        if found:
            log.info("%s: ignoring %s (retired: %s)", source, key, why)
    moved = dict(MOVED_KEYS)
    for key in [k for k in _flat_keys(layer) if k in RENAMED_KEYS]:
        new = _renamed(key, method)
        # another method's setting in an old flat dump does nothing in this run: dropped
        mine = new in valid_keys() and (new.split(".")[1] == method or new.split(".")[1] not in METHOD_SECTIONS)
        moved[key] = (new, lambda v, new=new, mine=mine: {new: v} if mine else {})
    for old, (new, convert) in moved.items():
        found, value = _pop_dotted(layer, old)
        if not found:
            continue
        if command_line:
            raise ConfigError(f"'{old}' is now '{new}'; write {new}=... instead (each method has its own "
                              f"section: {', '.join(f'method.{m}.*' for m in METHOD_SECTIONS)})")
        log.warning("%s: '%s' is now '%s' (read as %s)", source, old, new, convert(value) or "unset")
        for key, v in convert(value).items():
            _set_dotted(layer, key, v)
    return layer


def _method_name(layer: dict, default: str) -> str:
    method = layer.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    return str(name) if name is not None else default


def _merge_layers(base: dict, child: dict) -> dict:
    """``child`` over ``base`` (plain dicts). A child that switches ``method.name`` does not inherit
    the base's section of the previous method (fmnist_byol on top of demo_fmnist's DINO settings)."""
    name = _method_name(child, _method_name(base, _DEFAULT_METHOD))
    if isinstance(base.get("method"), dict) and name != _method_name(base, _DEFAULT_METHOD):
        base = {**base, "method": {k: v for k, v in base["method"].items() if k not in METHOD_SECTIONS or k == name}}
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(child)))


def _check_method_sections(layer: dict, name: str, source: str) -> None:
    """A key of another method than ``method.name`` set to anything but its default is an error
    (default values pass, so a fully resolved config dump loads back)."""
    method = layer.get("method")
    if not isinstance(method, dict):
        return
    for section, schema in METHOD_SECTIONS.items():
        if section == name or not isinstance(method.get(section), dict):
            continue
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for key, value in method[section].items():
            if key not in defaults or value != defaults[key]:
                raise ConfigError(f"'method.{section}.{key}' in {source} is a setting of method {section}, but "
                                  f"method.name is {name}; set method.name={section} or use method.{name}.* keys")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError(f"_base_ cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _merge_layers(_read_yaml(preset_path(base), seen + (path,)), data)


def _parse_overrides(overrides: Sequence[str]) -> dict:
    for o in overrides:
        if o.startswith(("+", "~")):
            # Hydra's syntax for adding / deleting keys: every bcssl key exists in the schema
            key = o[1:].split("=", 1)[0]
            how = f"{key}=null to reset it" if o.startswith("~") else f"{key}=VALUE to set it"
            raise ConfigError(f"override '{o}': bcssl overrides only existing keys, and every key always exists "
                              f"(with its default); write {how}")
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.epochs=10)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse the overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None


#: model.* keys that only some backbones take: when the command line changes model.name, the values a
#: preset gave them (for its own model) are dropped, so the new model starts from its own defaults
MODEL_SPECIFIC_KEYS = ("kernel_size", "dw_norm", "stem_stride", "depths", "dims")


def _follow_model_name(layers: list[dict], overrides: dict) -> list[str]:
    """When ``overrides`` set ``model.name`` to another model than the preset's, remove the preset's
    model-specific keys that the overrides do not set themselves. Returns the removed keys."""
    new_name = (overrides.get("model") or {}).get("name")
    if new_name is None:
        return []
    dropped = []
    for layer in layers:
        model = layer.get("model") or {}
        if model.get("name", ModelConfig.name) == new_name:
            continue
        for key in MODEL_SPECIFIC_KEYS:
            if key in model and key not in overrides["model"]:
                del model[key]
                dropped.append(f"model.{key}")
    return sorted(set(dropped))


_OVERRIDES = "the command-line overrides"


def load_config(preset_or_yaml: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve a full run configuration. Raises :class:`ConfigError` with a clear message."""
    cfg = OmegaConf.structured(Config)
    user: dict = {}
    for layer, source in _layers(preset_or_yaml, overrides):
        name = _method_name(layer, _method_name(user, _DEFAULT_METHOD))
        layer = _migrate(layer, source, name, command_line=source == _OVERRIDES)
        if source == _OVERRIDES:
            _follow_model_name([user], layer)
        _check_keys(_flat_keys(layer), source)
        _check_method_sections(layer, name, source)
        user = _merge_layers(user, layer)
    try:
        cfg = OmegaConf.merge(cfg, user)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}': {msg}") from None
    _validate(cfg)
    return cfg


def _layers(preset_or_yaml: str | None, overrides: Sequence[str]) -> list[tuple[dict, str]]:
    layers = []
    if preset_or_yaml:
        path = preset_path(preset_or_yaml)
        layers.append((_read_yaml(path), str(path)))
    layers.append((_parse_overrides(overrides), _OVERRIDES))
    return layers


def _validate(cfg: DictConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    need(cfg.train.steps is None or cfg.train.steps >= 1, f"train.steps must be >= 1 (or null), got {cfg.train.steps}")
    need(cfg.demo.budget_min is None or cfg.demo.budget_min > 0,
         f"demo.budget_min must be a positive number of minutes (or null), got {cfg.demo.budget_min}")
    need(cfg.demo.probe_steps >= 2,
         f"demo.probe_steps must be >= 2 (the first is not timed), got {cfg.demo.probe_steps}")
    need(0 <= cfg.demo.margin < 1, f"demo.margin must be in [0, 1), got {cfg.demo.margin}")
    need(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    need(cfg.train.amp in AMP_MODES, f"train.amp must be none, bf16 or fp16, got '{cfg.train.amp}'")
    need(cfg.crops.n_local >= 0, "crops.n_local must be >= 0")
    need(len(cfg.crops.blur_p) == 3 and len(cfg.crops.solarize_p) == 3,
         "crops.blur_p and crops.solarize_p need 3 values: global1, global2, locals")
    need(cfg.data.limit is None or cfg.data.limit > 0, "data.limit must be a positive number of images")
    folder = str(cfg.data.name).lower().replace("-", "_") == "image_folder"
    need(folder or (cfg.data.file_list is None and not cfg.data.decode_on_device),
         f"data.file_list and data.decode_on_device need data.name=image_folder (got {cfg.data.name})")
    ed = cfg.eval.data
    need(1 <= ed.crop_size <= ed.resize_size,
         f"eval.data.crop_size must be in [1, eval.data.resize_size] (a centre crop of the resized image), "
         f"got crop {ed.crop_size}, resize {ed.resize_size}")
    dm = cfg.detection.min_size
    need(len(dm) == 2 and 0 < dm[0] <= dm[1], f"detection.min_size must be [low, high] shorter sides, got {list(dm)}")
    need(cfg.detection.amp in AMP_MODES,
         f"detection.amp must be none, bf16 or fp16, got '{cfg.detection.amp}'")
    need(cfg.detection.batch_size >= 1 and cfg.detection.epochs >= 1,
         "detection.batch_size and detection.epochs must be >= 1")
    bad = [b for b in cfg.log.backends if b not in LOG_BACKENDS]
    need(not bad, f"log.backends: unknown backend(s) {', '.join(map(str, bad))}; valid: {', '.join(LOG_BACKENDS)}")
    need(cfg.linear.protocol in ("auto", "dino_eval_linear", "cached_features"),
         f"linear.protocol must be auto, dino_eval_linear or cached_features, got '{cfg.linear.protocol}'")
    rc = cfg.robustness
    need(rc.sampling in ("auto", "first", "strided"),
         f"robustness.sampling must be auto, first or strided, got '{rc.sampling}'")
    need(rc.kind in (None, "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch"),
         f"robustness.kind must be imagenet_c, imagenet_a, imagenet_r or imagenet_sketch, got '{rc.kind}'")
    for key in ("corruption_limit", "folder_limit"):
        need(rc[key] is None or rc[key] > 0, f"robustness.{key} must be a positive number of images (or null: all)")
    need(cfg.throughput.amp in AMP_MODES, f"throughput.amp must be none, bf16 or fp16, got '{cfg.throughput.amp}'")
    need(cfg.method.dino.centering in ("centre", "sinkhorn_knopp"),
         f"method.dino.centering must be centre or sinkhorn_knopp, got '{cfg.method.dino.centering}'")
    need(cfg.method.dino.koleo_weight >= 0,
         f"method.dino.koleo_weight must be >= 0, got {cfg.method.dino.koleo_weight}")
    need(cfg.eval.encoder in ("auto", "student", "teacher"),
         f"eval.encoder must be auto, student or teacher, got '{cfg.eval.encoder}'")


def check_required(cfg: DictConfig) -> None:
    """What a run needs that a config may leave open (``bcssl config show`` prints such configs;
    ``pretrain`` refuses them before importing torch or creating the run folder)."""
    if cfg.data.name == "image_folder" and not cfg.data.root:
        raise ConfigError("data.root is not set: data.name=image_folder needs the image folder, e.g. "
                          "data.root=/data/imagenet (with train/ and val/ class folders)")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, with only the section of ``method.name`` under ``method`` (the
    other methods' sections are their defaults and do nothing in this run)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    method = data.get("method")
    if isinstance(method, dict):
        data["method"] = {k: v for k, v in method.items() if k not in METHOD_SECTIONS or k == method.get("name")}
    return OmegaConf.to_yaml(OmegaConf.create(data))
