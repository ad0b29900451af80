"""Load a run configuration: schema defaults <- preset/YAML (with ``_base_`` inheritance) <- overrides."""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcssl.config.schema import AMP_MODES, Config

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
    """Read the keys of older bcssl versions in ``layer`` (:data:`MOVED_KEYS`, :data:`RETIRED_KEYS`)."""
    for key, why in RETIRED_KEYS.items():
        found, _ = _pop_dotted(layer, key)
        if found and command_line:
            raise ConfigError(f"{key} was retired: {why}")
        if found:
            log.info("%s: ignoring %s (retired: %s)", source, key, why)
    for old, (new, convert) in MOVED_KEYS.items():
        found, value = _pop_dotted(layer, old)
        if not found:
            continue
        if command_line:
            raise ConfigError(f"'{old}' is now '{new}'; write {new}=... instead")
        log.warning("%s: '%s' is now '%s' (read as %s)", source, old, new, convert(value) or "unset")
        for key, v in convert(value).items():
            _set_dotted(layer, key, v)
    return layer
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
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. train.epochs=10)")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


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


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
