"""Load a run configuration: schema defaults <- preset/YAML (with ``_base_`` inheritance) <- overrides."""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcssl.config.schema import AMP_MODES, LOG_BACKENDS, Config, ModelConfig

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says what to change."""


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


#: keys that moved to an evaluation's own section: old key -> (new key, old value -> {new key: value}).
#: A YAML file with an old key (a run saved by an older bcssl) is read as the new one, with a warning;
#: an old key on the command line is an error naming the new one.
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


def _migrate(layer: dict, source: str, command_line: bool = False) -> dict:
    for old, (new, convert) in MOVED_KEYS.items():
        found, value = _pop_dotted(layer, old)
        if not found:
            continue
        if command_line:
            raise ConfigError(f"'{old}' is now '{new}'; write {new}=... instead")
        warnings.warn(f"{source}: '{old}' is now '{new}' (read as {convert(value) or 'unset'})", stacklevel=3)
        for key, v in convert(value).items():
            _set_dotted(layer, key, v)
    return layer


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
    merged = OmegaConf.merge(OmegaConf.create(_read_yaml(preset_path(base), seen + (path,))),
                             OmegaConf.create(data))
    return OmegaConf.to_container(merged)


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
MODEL_SPECIFIC_KEYS = ("kernel_size", "dw_norm", "stem_stride", "depths", "dims", "random_patch_projection")


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


def load_config(preset_or_yaml: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve a full run configuration. Raises :class:`ConfigError` with a clear message."""
    cfg = OmegaConf.structured(Config)
    layers = []
    if preset_or_yaml:
        path = preset_path(preset_or_yaml)
        layer = _migrate(_read_yaml(path), str(path))
        _check_keys(_flat_keys(layer), str(path))
        layers.append(layer)
    ov = _migrate(_parse_overrides(overrides), "the command-line overrides", command_line=True)
    _check_keys(_flat_keys(ov), "the command-line overrides")
    _follow_model_name(layers, ov)
    layers.append(ov)
    try:
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}': {msg}") from None
    _validate(cfg)
    return cfg


def _validate(cfg: DictConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    need(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    need(cfg.train.amp in AMP_MODES, f"train.amp must be none, bf16 or fp16, got '{cfg.train.amp}'")
    need(cfg.crops.n_local >= 0, "crops.n_local must be >= 0")
    need(len(cfg.crops.blur_p) == 3 and len(cfg.crops.solarize_p) == 3,
         "crops.blur_p and crops.solarize_p need 3 values: global1, global2, locals")
    need(cfg.data.limit is None or cfg.data.limit > 0, "data.limit must be a positive number of images")
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
    need(cfg.eval.encoder in ("auto", "student", "teacher"),
         f"eval.encoder must be auto, student or teacher, got '{cfg.eval.encoder}'")


def check_required(cfg: DictConfig) -> None:
    """What a run needs that a config may leave open (``bcssl config show`` prints such configs;
    ``pretrain`` refuses them before importing torch or creating the run folder)."""
    if cfg.data.name == "image_folder" and not cfg.data.root:
        raise ConfigError("data.root is not set: data.name=image_folder needs the image folder, e.g. "
                          "data.root=/data/imagenet (with train/ and val/ class folders)")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
