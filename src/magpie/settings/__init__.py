"""Run configuration: one settings model (:class:`RunConfig`, its sections
derived from it) filled from defaults < config file < environment < flags.

``model``: the settings and their sections; ``sources``: the config file, the
``MAGPIE_*`` variables and the flags, merged and validated; ``traits``: what
the settings know of each backend.
"""

from __future__ import annotations

from magpie.settings.model import RunConfig, SystemSpec, preset_prompt, presets
from magpie.settings.sources import (
    build_config,
    env_settings,
    flat_settings,
    load_config_file,
    semantic_config,
    setting_path,
)
from magpie.settings.traits import BACKENDS, DEFAULT_EMBEDDER, BackendTraits

__all__ = [
    "BACKENDS",
    "DEFAULT_EMBEDDER",
    "BackendTraits",
    "RunConfig",
    "SystemSpec",
    "build_config",
    "env_settings",
    "flat_settings",
    "load_config_file",
    "preset_prompt",
    "presets",
    "semantic_config",
    "setting_path",
]
