"""The file commands: ``filter``, ``dedup``, ``merge``, ``export``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from magpie.cli import publish
from magpie.cli.options import (
    CardLanguages,
    CardLicense,
    CardName,
    ConfigFile,
    Debug,
    JudgeBackend,
    MinDifficulty,
    MinQuality,
    MinResponseScore,
    Quiet,
    SemanticBackend,
    SemanticHost,
    SemanticModel,
    SemanticThreshold,
    empty_is_unset,
    given_settings,
)
from magpie.cli.report import report_error
from magpie.cli.terminal import err, fail
from magpie.errors import ExitStatus, MagpieError, OutputClosed, UsageError
from magpie.store.targets import STDIO


def filter_cmd(
    ctx: typer.Context,
    input: str = typer.Argument(..., help="magpie JSONL to filter."),
    output: str = typer.Option(
        ..., "-o", "--output", help="Where kept records go (appended; resumable)."
    ),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Where rejected records go, with reasons."
    ),
    judge: str | None = typer.Option(
        None, "--judge", help="Judge model (a model name on --judge-backend, or a .gguf)."
    ),
    judge_backend: JudgeBackend = None,
    judge_host: str | None = typer.Option(
        None,
        "--host",
        "--judge-host",
        help="URL of the judge's server (Ollama's, or an OpenAI-compatible one with "
        "--judge-backend openai).",
    ),
    judge_prompt: Path | None = typer.Option(
        None, "--judge-prompt", help="Judge system prompt file."
    ),
    min_quality: MinQuality = None,
    min_difficulty: MinDifficulty = None,
    min_response_score: MinResponseScore = None,
    categories: str | None = typer.Option(
        None, "--categories", callback=empty_is_unset, help="Comma-separated categories to keep."
    ),
    drop_unsafe: bool | None = typer.Option(None, "--drop-unsafe", show_default=False),
    filters_language: str | None = typer.Option(
        None, "--language", help="Keep only this language (ISO 639-1)."
    ),
    concurrency: str | None = typer.Option(
        None, "--concurrency", "-c", help="Records in flight (default 4)."
    ),
    overwrite: bool | None = typer.Option(
        None, "--overwrite", help="Start output and rejects afresh."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds of silence before a retry."
    ),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Retries of a failed request."
    ),
    config: ConfigFile = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Judge and rule-filter an existing magpie JSONL (streaming, resumable)."""
    from magpie.cli.report import Reporter

    reporter = Reporter(quiet=quiet)
    flags = given_settings(ctx)  # each parameter named after a setting (cli.options)
    try:
        from magpie.commands.filter import afilter
        from magpie.commands.generate import RunControl
        from magpie.settings import build_config

        cfg = build_config(flags, config_file=config)

        async def run() -> Any:
            control = RunControl()
            loop = asyncio.get_running_loop()
            for sig, status in (
                (signal.SIGINT, ExitStatus.INTERRUPTED),
                (signal.SIGTERM, ExitStatus.TERMINATED),
            ):
                loop.add_signal_handler(sig, control.request_stop, status)
            return await afilter(input, cfg, control=control), control

        result, control = asyncio.run(run())
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise typer.Exit(int(report_error(exc, reporter, debug))) from None
    st = result.stats
    rej = ", ".join(f"{k} {v}" for k, v in sorted(st.rejected.items()))
    reporter.info(
        f"{st.written} kept, {st.rejected_total} rejected"
        + (f" ({rej})" if rej else "")
        + f", {result.skipped} already done, {result.judged} judged, {result.reused} tags reused",
        event="summary",
    )
    raise typer.Exit(int(control.stop_status) if control.stopped else 0)


def dedup(
    input: str = typer.Argument(..., help="magpie JSONL, or - for stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Deduplicated JSONL, or - for stdout."),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Write dropped records here, each naming the id it duplicates."
    ),
    threshold: float = typer.Option(
        0.7,
        "--threshold",
        help="Estimated Jaccard (character 5-grams) that makes a near-duplicate.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    semantic_model: SemanticModel = None,
    semantic_threshold: SemanticThreshold = None,
    semantic_backend: SemanticBackend = None,
    semantic_host: SemanticHost = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Drop exact and near-duplicate instructions (keeps the first of each group)."""
    try:
        from magpie.commands.dedup import dedup_path

        counts = dedup_path(
            input,
            output,
            rejects=rejects,
            threshold=threshold,
            semantic=(semantic_model, semantic_threshold, semantic_backend, semantic_host),
            overwrite=overwrite,
        )
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    if not quiet:
        semantic = f", {counts.semantic} semantic" if counts.semantic_on else ""
        err(
            f"magpie: {counts.kept} kept, {counts.duplicates} duplicates dropped "
            f"({counts.exact} exact, {counts.near} near{semantic}) of {counts.total}"
        )


def merge(
    inputs: list[str] = typer.Argument(
        ..., help="magpie JSONL files (e.g. the shards of one run), read in this order."
    ),
    output: str = typer.Option(
        ..., "-o", "--output", help="Merged JSONL (and its manifest), or - for stdout."
    ),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Write dropped records here, each naming the id it duplicates."
    ),
    no_dedup: bool = typer.Option(
        False, "--no-dedup", help="Drop only records whose id repeats; keep duplicate instructions."
    ),
    threshold: float = typer.Option(
        0.7,
        "--threshold",
        "--dedup-threshold",
        help="Estimated Jaccard (character 5-grams) that makes a near-duplicate.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    allow_mixed: bool = typer.Option(
        False, "--allow-mixed", help="Merge files made with different models or templates."
    ),
    semantic_model: SemanticModel = None,
    semantic_threshold: SemanticThreshold = None,
    semantic_backend: SemanticBackend = None,
    semantic_host: SemanticHost = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Combine several outputs (shards) into one, with global dedup and a merged manifest."""
    embedder = None
    try:
        from magpie.commands.dedup import semantic_options
        from magpie.commands.merge import merge_files

        opts, embedder = semantic_options(
            semantic_model, semantic_threshold, semantic_backend, semantic_host, dedup=not no_dedup
        )
        report = merge_files(
            inputs,
            output,
            rejects=rejects,
            dedup=not no_dedup,
            threshold=threshold,
            overwrite=overwrite,
            allow_mixed=allow_mixed,
            **opts,
        )
    except OutputClosed:
        # `magpie merge ... -o - | head`: the reader has what it wanted.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    finally:
        if embedder is not None:
            embedder.close()
    if not quiet:
        for note in report.notes:
            err(f"magpie: note: {note}")
        where = f"; manifest {report.manifest_path}" if report.manifest_path else ""
        err(f"magpie: merged {report.summary()}{where}")


def export(
    input: str = typer.Argument(..., help="magpie JSONL file, or - for stdin."),
    format: str = typer.Option(
        ...,
        "--format",
        "-f",
        help="openai, sharegpt, alpaca, dpo; hf (a dataset folder), sqlite (for Datasette).",
    ),
    output: str = typer.Option(
        "-", "-o", "--output", help="Output JSONL file, or - for stdout (hf: a folder)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    rejects: Path | None = typer.Option(
        None, "--rejects", help="hf, sqlite: the rejects file of the same runs."
    ),
    license: CardLicense = "unknown",
    language: CardLanguages = None,
    name: CardName = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert a magpie JSONL to the formats Axolotl, LLaMA-Factory and TRL read,
    or (--format hf) a Hugging Face dataset folder: Parquet and a dataset card."""
    if format == "hf":
        publish.export_folder(
            input, output, rejects, overwrite, license, language, name, quiet, debug
        )
        return
    if format == "sqlite":
        publish.export_database(input, output, rejects, overwrite, quiet, debug)
        return
    if rejects is not None:
        raise fail(UsageError("--rejects goes with --format hf or sqlite"), debug) from None
    try:
        from magpie.commands.export import export_file

        count = export_file(input, format, output, overwrite=overwrite)
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    why = count.explain(format)
    if count == 0 and why:
        # Nothing to hand on: a nightly pipeline must notice (exit 1).
        err(f"magpie: error: nothing exported as {format}: {why}")
        raise typer.Exit(int(ExitStatus.ERROR))
    if not quiet:
        err(
            f"magpie: exported {count} records as {format}"
            + (f" to {output}" if output != STDIO else "")
            + (f" ({why})" if why else "")
        )
