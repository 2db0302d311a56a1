"""Options declared once and shared by the commands that take them."""

from __future__ import annotations

from typing import Annotated

import typer

# Options every command (or most) takes.
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors on stderr.")]

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


def categories_flag(text: str | None) -> list[str] | None:
    if not text:
        return None
    from magpie.pipeline.stages.judge import parse_categories

    return parse_categories(text)
