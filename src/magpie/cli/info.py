"""Commands that look and tell: ``stats``, ``doctor``, ``templates list|show``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import typer

from magpie.cli.options import (
    ConfigFile,
    DataWithManifest,
    Debug,
    RejectsOfRuns,
    SemanticBackend,
    SemanticHost,
    given_settings,
)
from magpie.cli.terminal import _stdout_console, err, fail, out
from magpie.errors import MagpieError


def stats(
    input: DataWithManifest,
    rejects: RejectsOfRuns = None,
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON on stdout."),
    html: Path | None = typer.Option(
        None, "--html", help="Write a self-contained HTML report with charts."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --html file."),
    semantic_model: str | None = typer.Option(
        None,
        "--semantic-model",
        help="Embedding model (e.g. nomic-embed-text): add the mean pairwise cosine distance "
        "of the instructions.",
    ),
    semantic_backend: SemanticBackend = None,
    semantic_host: SemanticHost = None,
    debug: Debug = False,
) -> None:
    """Counts, reject reasons, judge tags, lengths, tokens per pair, throughput, diversity."""
    embedder = None
    try:
        from magpie.commands.stats import (
            check_html_target,
            compute_stats,
            render_rich,
            to_json,
            write_html,
        )

        if html is not None:
            check_html_target(html, [input, rejects], overwrite=overwrite)
        from magpie.commands.dedup import semantic_options

        opts, embedder = semantic_options(
            semantic_model, None, semantic_backend, semantic_host, dedup=True
        )
        data = compute_stats(
            Path(input), rejects=rejects, embed=embedder, embed_name=opts.get("embed_name")
        )
        if html is not None:
            write_html(data, html, inputs=[input, rejects], overwrite=overwrite)
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    finally:
        if embedder is not None:
            embedder.close()
    for note in data.notes:
        err(f"magpie: note: {note}")
    if as_json:
        out(to_json(data))
    else:
        render_rich(data, _stdout_console())
    if html is not None:
        err(f"magpie: wrote {html}")


def doctor(
    ctx: typer.Context,
    host: str | None = typer.Option(
        None,
        "--host",
        help="Server URL (Ollama's, or an OpenAI-compatible one with --backend openai).",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Ollama model name, a .gguf file (embedded), or the served model id (openai).",
    ),
    backend: str | None = typer.Option(None, "--backend", help="auto, ollama, openai or embedded."),
    template: str | None = typer.Option(
        None, "--template", "-t", help="Template family, auto or a file."
    ),
    system: str | None = typer.Option(None, "--system", help="System prompt for the pre-query."),
    config: ConfigFile = None,
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON on stdout."),
    debug: Debug = False,
) -> None:
    """Check that `magpie generate` would work here, and say what to do if not.

    Exit 0 only when every check passed (3: backend or model missing; 2: bad
    settings or template; 1: the smoke generation failed).
    """
    try:
        from magpie.commands.doctor import (
            checks_to_json,
            doctor_exit_status,
            render_checks,
            run_doctor,
        )
        from magpie.settings import build_config

        cfg = build_config(given_settings(ctx), config_file=config)
        checks = asyncio.run(run_doctor(cfg))
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    status = int(doctor_exit_status(checks))
    if as_json:
        out(checks_to_json(checks), gone=status)  # `| head`: the verdict stands
    else:
        from rich.console import Console

        render_checks(checks, Console(stderr=True))
    raise typer.Exit(status)


def templates_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the known template families."""
    from magpie.templates import families

    fams = families()
    if as_json:
        out(json.dumps([f.model_dump() for f in fams.values()], indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(title="magpie template families")
    table.add_column("name")
    table.add_column("aliases")
    table.add_column("pre-query (escaped)")
    table.add_column("system slot")
    for f in fams.values():
        table.add_row(
            f.name,
            ", ".join(f.aliases),
            json.dumps(f.pre_query, ensure_ascii=False),
            "yes" if f.system_pre_query else "no",
        )
    _stdout_console(soft_wrap=False).print(table)


def templates_show(
    name: str = typer.Argument(..., help="Family name or alias, or a template TOML file."),
    system: str | None = typer.Option(None, "--system", help="Render with this system prompt."),
    debug: Debug = False,
) -> None:
    """Show a family's exact strings (JSON-escaped)."""
    try:
        from magpie.templates import get_family, load_family_file
        from magpie.templates.injection import check_prompt_text

        fam = (
            load_family_file(name)
            if (name.endswith(".toml") or os.sep in name)
            else get_family(name)
        )
        if system is not None:
            check_prompt_text("--system", system, fam.forbidden_tokens)
        rows = {
            "name": fam.name,
            "description": fam.description,
            "aliases": fam.aliases,
            "bos": fam.bos,
            "pre_query": fam.pre_query,
            "system_pre_query": fam.system_pre_query,
            "rendered": fam.render(system),
            "user_header": fam.user_header,
            "stop": fam.stop,
            "markers": fam.markers,
            "forbidden_in_instructions": fam.forbidden_tokens,
        }
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        out(f"{key:<{width}}  {json.dumps(value, ensure_ascii=False)}")
