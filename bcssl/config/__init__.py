"""Configuration: structured defaults + a preset YAML + ``key=value`` overrides (OmegaConf).

Every key a run can use is declared in :mod:`bcssl.config.schema`; an unknown key is an error
that names the closest valid key, so a typo never silently trains the wrong thing.
"""
from bcssl.config.loader import ConfigError, check_required, list_presets, load_config, preset_path, to_yaml

__all__ = ["ConfigError", "check_required", "list_presets", "load_config", "preset_path", "to_yaml"]
