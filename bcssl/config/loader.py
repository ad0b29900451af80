"""Load a run configuration: schema defaults <- preset/YAML (with ``_base_`` inheritance) <- overrides."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bcssl.config.schema import AMP_MODES, Config

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
        layer = _read_yaml(path)
        _check_keys(_flat_keys(layer), str(path))
        layers.append(layer)
    ov = _parse_overrides(overrides)
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
    need(cfg.train.steps is None or cfg.train.steps >= 1, f"train.steps must be >= 1 (or null), got {cfg.train.steps}")
    need(cfg.demo.budget_min is None or cfg.demo.budget_min > 0,
         f"demo.budget_min must be a positive number of minutes (or null), got {cfg.demo.budget_min}")
    need(cfg.demo.probe_steps >= 2, f"demo.probe_steps must be >= 2 (the first is not timed), got {cfg.demo.probe_steps}")
    need(0 <= cfg.demo.margin < 1, f"demo.margin must be in [0, 1), got {cfg.demo.margin}")
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
    need(cfg.method.centering in ("centre", "sinkhorn_knopp"),
         f"method.centering must be centre or sinkhorn_knopp, got '{cfg.method.centering}'")
    need(cfg.method.koleo_weight >= 0, f"method.koleo_weight must be >= 0, got {cfg.method.koleo_weight}")
    need(cfg.eval.encoder in ("auto", "student", "teacher"),
         f"eval.encoder must be auto, student or teacher, got '{cfg.eval.encoder}'")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
