"""Options declared once and shared by the commands that take them, and how
an option reaches its setting.

A command's parameter that is named after a setting *is* that setting's
option: ``num`` is ``RunConfig.num``, ``instruction_temperature`` is
``instruction.temperature`` (the names ``MAGPIE_*`` variables use, see
:func:`magpie.settings.setting_path`).  :func:`given_settings` hands the ones
given on the command line to :func:`magpie.settings.build_config`, over the
config file and the environment.  A new setting costs one ``RunConfig`` field
and one parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

# Options every command (or most) takes.
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors on stderr.")]
#: A settings file (``filter`` and ``doctor``; generate says more).
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML or YAML settings file.")]

# Semantic dedup's options, shared by generate, dedup and merge.
SemanticModel = Annotated[
    str | None,
    typer.Option(
        "--semantic-model",
        help="Embedding model (e.g. nomic-embed-text): also drop semantic duplicates.",
    ),
]
SemanticThreshold = Annotated[
    float | None,
    typer.Option(
        "--semantic-threshold",
        help="Cosine similarity from which instructions are semantic duplicates (0.95).",
    ),
]
SemanticBackend = Annotated[
    str | None,
    typer.Option(
        "--semantic-backend",
        help="ollama or openai (generate: the generator's when it is one of them; else ollama).",
    ),
]
SemanticHost = Annotated[
    str | None,
    typer.Option(
        "--semantic-host",
        help="URL of the embedding server (generate: the generator's first host; else "
        "$OLLAMA_HOST or http://127.0.0.1:11434).",
    ),
]

# The judge's thresholds, shared by generate and filter.
JudgeBackend = Annotated[
    str | None, typer.Option("--judge-backend", help="auto, ollama, openai or embedded.")
]
MinQuality = Annotated[str | None, typer.Option("--min-quality", help="very poor .. excellent")]
MinDifficulty = Annotated[
    str | None, typer.Option("--min-difficulty", help="very easy .. very hard")
]
MinResponseScore = Annotated[int | None, typer.Option("--min-response-score", help="1-10")]

# What reads a dataset and its manifest: stats, card.
DataWithManifest = Annotated[
    str, typer.Argument(help="magpie JSONL (its manifest is read when present).")
]
RejectsOfRuns = Annotated[
    Path | None, typer.Option("--rejects", help="Rejects file of the same runs.")
]

# The dataset card's options, shared by card and export --format hf.
CardLicense = Annotated[
    str,
    typer.Option(
        "--license",
        help="The card's license (a Hub license id); `unknown` until you choose one.",
    ),
]
CardLanguages = Annotated[
    list[str] | None,
    typer.Option("--language", help="A language of the data (ISO 639-1; repeat for several)."),
]
CardName = Annotated[str | None, typer.Option("--name", help="The card's pretty name.")]


def switched_off(value: bool | None) -> bool | None:
    """The callback of a ``--no-X`` flag on the setting ``X``: given, it sets
    ``X`` to False."""
    return False if value else None


def empty_is_unset(value: str | None) -> str | None:
    """The callback of an option whose empty value means "not given"
    (``--categories ""``: the config file's or environment's list stays)."""
    return value or None


def given_settings(ctx: typer.Context) -> dict[str, Any]:
    """The settings given on this command line: each parameter named after a
    setting that the user passed (defaults stay out, so that a config file or
    the environment can set them)."""
    try:  # typer >= 0.29 vendors click
        from typer._click.core import ParameterSource
    except ImportError:  # pragma: no cover
        from click.core import ParameterSource  # type: ignore[no-redef]

    from magpie.settings import flat_settings

    unset = (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return flat_settings(
        {
            name: value
            for name, value in ctx.params.items()
            if ctx.get_parameter_source(name) not in unset
        }
    )
