"""Where settings come from: defaults < config file < environment < flags.

A config file is TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) holding the same
settings as the ``generate`` flags (see configs/).  Environment variables are
``MAGPIE_<KEY>`` (``MAGPIE_INSTRUCTION_TEMPERATURE`` for nested keys) and
``OLLAMA_HOST``; a flag is the parameter of the same name (magpie.cli.options).
Everything is validated by pydantic; an error names the bad key and where it
came from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from pydantic import ValidationError

from magpie.backends.base import Sampling
from magpie.errors import UsageError
from magpie.pipeline.stages.filters import FilterSettings
from magpie.settings.model import RunConfig
from magpie.settings.traits import BACKENDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


_NESTED = ("instruction", "response", "filters")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict (exit 2 on any problem)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise UsageError(f"config file is a directory: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {p}: {exc}") from None
    if p.suffix.lower() == ".json":
        import json

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"config file {p} is not valid JSON: {exc}") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(
                f"config file {p} is not valid YAML: {' '.join(str(exc).split())}"
            ) from None
        data = {} if data is None else data
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {p} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {p} must hold a table of settings, not {type(data).__name__}"
        )
    return data


def setting_path(name: str) -> tuple[str, ...] | None:
    """Where a flat name, as a flag's parameter or a ``MAGPIE_*`` variable spells
    it, sits in the settings: ``("num",)``, ``("instruction", "temperature")``
    for ``instruction_temperature``; None for a name that is no setting."""
    for nested in _NESTED:
        if name.startswith(nested + "_"):
            return nested, name[len(nested) + 1 :]
    if name in RunConfig.model_fields and name not in _NESTED:
        return (name,)
    return None


def flat_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Settings from flat names (see :func:`setting_path`); names that are no
    setting are left out.  A path becomes a string (``judge_prompt``)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        path = setting_path(name)
        if path is None:
            continue
        if isinstance(value, PurePath):
            value = str(value)
        if len(path) == 2:
            out.setdefault(path[0], {})[path[1]] = value
        else:
            out[name] = value
    return out


def env_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``MAGPIE_*`` variables and ``OLLAMA_HOST``."""
    out: dict[str, Any] = {}
    if environ.get("OLLAMA_HOST"):
        out["host"] = environ["OLLAMA_HOST"]
    flat = {
        key[len("MAGPIE_") :].lower(): value
        for key, value in environ.items()
        if key.startswith("MAGPIE_") and value != ""
    }
    for name in ("extra_stop", "categories"):
        if name in flat:
            flat[name] = flat[name].split(",")
    return out | flat_settings(flat)


def _merge(
    base: dict[str, Any], over: Mapping[str, Any], source: str, sources: dict[str, str]
) -> None:
    for key, value in over.items():
        if value is None:
            continue
        if key in _NESTED and isinstance(value, Mapping):
            sub = base.setdefault(key, {})
            if not isinstance(sub, dict):
                sub = base[key] = {}
            for k, v in value.items():
                if v is not None:
                    sub[k] = v
                    sources[f"{key}.{k}"] = source
        else:
            base[key] = value
            sources[key] = source


def build_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Merge defaults < config file < environment < flags, and validate."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        _merge(merged, load_config_file(config_file), f"config file {config_file}", sources)
    _merge(merged, env_settings(os.environ if environ is None else environ), "environment", sources)
    _merge(merged, flags or {}, "command line", sources)
    env = os.environ if environ is None else environ
    traits = BACKENDS.get(merged.get("backend"))  # type: ignore[arg-type]
    if (
        traits is not None
        and not traits.reads_ollama_host
        and sources.get("host") == "environment"
        and merged.get("host") == env.get("OLLAMA_HOST")
    ):
        # OLLAMA_HOST names an Ollama server, not an OpenAI-compatible one
        # (those read OPENAI_BASE_URL).
        del merged["host"]
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        full = ".".join(str(x) for x in err["loc"])
        known = {*RunConfig.model_fields, *Sampling.model_fields, *FilterSettings.model_fields}
        # Union branches add names such as "constrained-int" to the location.
        loc = ".".join(str(x) for x in err["loc"] if str(x) in known) or full
        parts = full.split(".")
        key = ".".join(parts[:2]) if parts[0] in _NESTED else parts[0]
        where = sources.get(key) or sources.get(parts[0]) or "settings"
        if err["type"] == "extra_forbidden":
            names = (
                (FilterSettings if parts[0] == "filters" else Sampling).model_fields
                if parts[0] in _NESTED and len(parts) > 1
                else RunConfig.model_fields
            )
            raise UsageError(
                f"unknown setting {full!r} in {where}; known settings"
                + (f" of [{parts[0]}]" if len(parts) > 1 else "")
                + ": "
                + ", ".join(names)
            ) from None
        value = err.get("input")
        shown = f" {value!r}" if not isinstance(value, dict) else ""
        raise UsageError(f"bad value{shown} for {loc} (from {where}): {err['msg']}") from None


def semantic_config(flags: dict[str, Any]) -> RunConfig:
    """The semantic settings of ``magpie dedup`` and ``magpie merge``: their
    flags over the ``MAGPIE_SEMANTIC_*`` variables, validated (exit 2).
    Without a generator, the embedding model is on Ollama at its default host
    unless ``--semantic-backend``/``--semantic-host`` say otherwise."""
    environ = {k: v for k, v in os.environ.items() if k.startswith("MAGPIE_SEMANTIC_")}
    config = build_config(flags, environ=environ)
    config.validate_semantic()
    return config
