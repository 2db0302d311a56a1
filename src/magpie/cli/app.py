"""The ``magpie`` command: a thin Typer layer over the library.

stdout carries data only (JSONL); progress, logs and the summary go to stderr.
Exit codes are :class:`magpie.errors.ExitStatus`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from magpie import __version__
from magpie.errors import ExitStatus, MagpieError, OutputClosed, os_error_line
from magpie.store.targets import STDIO

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="magpie",
    help="Create instruction-tuning datasets from local LLMs with the Magpie method.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
templates_app = typer.Typer(
    help="List and show the pre-query template families.", no_args_is_help=True
)
app.add_typer(templates_app, name="templates")

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


def err(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def fail(exc: BaseException, debug: bool) -> typer.Exit:
    """Report an error as one line (a traceback only with --debug)."""
    if isinstance(exc, (BrokenPipeError, OutputClosed)):
        # `magpie ... -o - | head`: the reader has what it wanted; not an error.
        _silence_stdout()
        return typer.Exit(int(ExitStatus.OK))
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, MagpieError):
        err(f"magpie: error: {exc}")
        return typer.Exit(int(exc.exit_status))
    if isinstance(exc, OSError) and exc.errno is not None:
        line, status = os_error_line(exc)
        err(f"magpie: error: {line}")
        return typer.Exit(int(status))
    first = (str(exc).strip().splitlines() or [""])[0]
    err(f"magpie: error: {exc.__class__.__name__}: {first} (run with --debug for a traceback)")
    return typer.Exit(int(ExitStatus.ERROR))


def _flush_stdout() -> int | None:
    """Flush what stdout still buffers; the exit status when that fails."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        line, status = os_error_line(exc)
        err(f"magpie: error: cannot write to stdout: {line}")
        _silence_stdout()
        return int(status)
    return None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"magpie {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Create instruction-tuning datasets from local LLMs with the Magpie method.

    Exit codes: 0 done; 1 failure during the run; 2 bad usage or input;
    3 backend unreachable or model missing; 4 output locked by another run;
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
    """


# --------------------------------------------------------------------------- generate
@app.command()
def generate(
    num: int | None = typer.Option(
        None,
        "-n",
        "--num",
        help="Records the output should hold (default 100). An existing output is topped up to this count.",
    ),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output JSONL file, or - for stdout (default -)."
    ),
    overwrite: bool | None = typer.Option(
        None,
        "--overwrite",
        help="Start the output afresh instead of topping it up.",
        show_default=False,
    ),
    allow_mixed: bool | None = typer.Option(
        None,
        "--allow-mixed",
        help="Top up a file made with another model or template.",
        show_default=False,
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="auto (Ollama if it is running, else embedded), ollama, embedded, or openai "
        "(an OpenAI-compatible server: vLLM, SGLang, llama.cpp llama-server, LM Studio).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Ollama model name, or a .gguf file for the embedded backend."
    ),
    host: list[str] | None = typer.Option(
        None,
        "--host",
        metavar="<url>",
        help="Ollama URL (default $OLLAMA_HOST or http://127.0.0.1:11434); repeat it to spread the work over several servers.",
    ),
    template: str | None = typer.Option(
        None,
        "--template",
        "-t",
        help="Template family name, auto (default), or a template TOML file.",
    ),
    system: str | None = typer.Option(
        None, "--system", help="System prompt rendered into the pre-query."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Run seed (default: random, or the output's own when topping up)."
    ),
    concurrency: str | None = typer.Option(
        None, "--concurrency", "-c", help="Pairs in flight: a number or auto (default)."
    ),
    instruction_temperature: float | None = typer.Option(
        None, "--instruction-temperature", help="Instruction sampling temperature (default 1.0)."
    ),
    instruction_top_p: float | None = typer.Option(
        None, "--instruction-top-p", help="Instruction top-p (default 1.0)."
    ),
    instruction_max_tokens: int | None = typer.Option(
        None, "--instruction-max-tokens", help="Instruction token limit (default 512)."
    ),
    response_temperature: float | None = typer.Option(
        None, "--response-temperature", help="Response temperature (default 0.0: greedy)."
    ),
    response_top_p: float | None = typer.Option(
        None, "--response-top-p", help="Response top-p (default 1.0)."
    ),
    response_max_tokens: int | None = typer.Option(
        None, "--response-max-tokens", help="Response token limit (default 2048)."
    ),
    keep_truncated: bool | None = typer.Option(
        None,
        "--keep-truncated",
        help="Keep responses cut by --response-max-tokens.",
        show_default=False,
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds of silence before a request is retried (default 300)."
    ),
    max_retries: int | None = typer.Option(
        None, "--max-retries", help="Retries of a failed request (default 5)."
    ),
    unreachable_budget: float | None = typer.Option(
        None,
        "--unreachable-budget",
        help="Seconds the backend may stay unreachable before the run stops with exit 3 (default 120).",
    ),
    backoff_base: float | None = typer.Option(
        None,
        "--backoff-base",
        help="First retry delay in seconds, doubled per retry (default 0.5).",
    ),
    grace_period: float | None = typer.Option(
        None,
        "--grace-period",
        help="Seconds pairs in flight get to finish after Ctrl-C/SIGTERM (default 10).",
    ),
    language: str | None = typer.Option(
        None, "--language", help="Keep only instructions in this language (ISO 639-1, e.g. en)."
    ),
    judge: str | None = typer.Option(
        None, "--judge", help="Judge model (Ollama name or .gguf), or 'same' for the generator."
    ),
    judge_backend: str | None = typer.Option(
        None, "--judge-backend", help="auto, ollama, openai or embedded."
    ),
    judge_host: str | None = typer.Option(None, "--judge-host", help="Ollama URL of the judge."),
    judge_prompt: Path | None = typer.Option(
        None, "--judge-prompt", help="Judge system prompt file (see configs/judge/)."
    ),
    prejudge: bool | None = typer.Option(
        None,
        "--prejudge",
        help="Judge each instruction before its response is generated (saves response tokens).",
        show_default=False,
    ),
    min_quality: str | None = typer.Option(None, "--min-quality", help="very poor .. excellent"),
    min_difficulty: str | None = typer.Option(
        None, "--min-difficulty", help="very easy .. very hard"
    ),
    min_response_score: int | None = typer.Option(None, "--min-response-score", help="1-10"),
    categories: str | None = typer.Option(
        None,
        "--categories",
        help='Comma-separated task categories to keep, e.g. "Math,Coding & Debugging".',
    ),
    drop_unsafe: bool | None = typer.Option(
        None, "--drop-unsafe", help="Reject pairs the judge calls unsafe.", show_default=False
    ),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Append rejected attempts to this JSONL."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="i/N: this machine's disjoint share of a run split over N machines."
    ),
    turns: int | None = typer.Option(
        None, "--turns", help="Conversations of T user turns (the model writes the follow-ups)."
    ),
    responses: int | None = typer.Option(
        None, "--responses", help="Sample K answers per instruction; with --judge: chosen/rejected."
    ),
    samples_per_request: int | None = typer.Option(
        None,
        "--samples-per-request",
        help="Instructions per pre-query request (the server's n, one prefill; --backend openai, "
        "e.g. vLLM; default 1).",
    ),
    system_preset: str | None = typer.Option(
        None, "--system-preset", help="Task-control system prompt: math, code or translation."
    ),
    no_dedup: bool = typer.Option(
        False, "--no-dedup", help="Keep near-duplicate instructions (dedup is on by default)."
    ),
    dedup_threshold: float | None = typer.Option(
        None, "--dedup-threshold", help="Jaccard from which instructions are near-duplicates (0.7)."
    ),
    semantic_model: SemanticModel = None,
    semantic_threshold: SemanticThreshold = None,
    semantic_backend: SemanticBackend = None,
    semantic_host: SemanticHost = None,
    config: Path | None = typer.Option(
        None, "--config", help="TOML or YAML file with these settings."
    ),
    log_file: Path | None = typer.Option(
        None,
        "--log-file",
        help="Append start, summary and errors to this file (always, even with --quiet).",
    ),
    log_format: str = typer.Option(
        "text", "--log-format", help="text or json (stderr and --log-file)."
    ),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Generate instruction/response pairs and write them as JSONL."""
    flags: dict[str, Any] = {
        "num": num,
        "output": output,
        "overwrite": overwrite,
        "allow_mixed": allow_mixed,
        "backend": backend,
        "model": model,
        "host": host or None,
        "template": template,
        "system": system,
        "seed": seed,
        "concurrency": concurrency,
        "keep_truncated": keep_truncated,
        "timeout": timeout,
        "max_retries": max_retries,
        "unreachable_budget": unreachable_budget,
        "grace_period": grace_period,
        "backoff_base": backoff_base,
        "judge": judge,
        "judge_backend": judge_backend,
        "judge_host": judge_host,
        "judge_prompt": str(judge_prompt) if judge_prompt else None,
        "prejudge": prejudge,
        "min_quality": min_quality,
        "min_difficulty": min_difficulty,
        "min_response_score": min_response_score,
        "categories": categories,
        "drop_unsafe": drop_unsafe,
        "rejects": rejects,
        "shard": shard,
        "turns": turns,
        "responses": responses,
        "samples_per_request": samples_per_request,
        "system_preset": system_preset,
        "dedup": False if no_dedup else None,
        "dedup_threshold": dedup_threshold,
        "semantic_model": semantic_model,
        "semantic_threshold": semantic_threshold,
        "semantic_backend": semantic_backend,
        "semantic_host": semantic_host,
        "filters": {"language": language},
        "instruction": {
            "temperature": instruction_temperature,
            "top_p": instruction_top_p,
            "max_tokens": instruction_max_tokens,
        },
        "response": {
            "temperature": response_temperature,
            "top_p": response_top_p,
            "max_tokens": response_max_tokens,
        },
    }
    if quiet:
        flags["quiet"] = True
    from magpie.cli.report import Reporter

    try:
        reporter = Reporter(quiet=quiet, log_file=log_file, fmt=log_format)  # type: ignore[arg-type]
    except MagpieError as exc:
        raise fail(exc, debug) from None
    try:
        status = _generate(flags, config, reporter, debug)
    finally:
        reporter.close()
    raise typer.Exit(int(status))


def _generate(
    flags: dict[str, Any], config_file: Path | None, reporter: Any, debug: bool
) -> ExitStatus:
    from magpie.cli.progress import Progress
    from magpie.commands.generate import RunControl, agenerate
    from magpie.settings import build_config

    try:
        flags["categories"] = _categories(flags.get("categories"))
        cfg = build_config(flags, config_file=config_file)
    except MagpieError as exc:
        return _report_error(exc, reporter, debug)
    if cfg.quiet:
        reporter.quiet = True
    progress = Progress(enabled=not cfg.quiet and reporter.fmt == "text")
    interrupts: list[int] = []

    def on_start(prep: Any, existing: Any, target: int) -> None:
        reporter.info(
            prep.reason, event="backend", backend=prep.backend.name, model=prep.backend.model
        )
        reporter.info(
            f"template {prep.pre_query.name} ({prep.pre_query.source}): {json.dumps(prep.pre_query.text)}",
            event="template",
            template=prep.pre_query.name,
        )
        if existing.count:
            reporter.info(
                f"{cfg.output} holds {existing.count} records; generating {target} more",
                event="top_up",
                existing=existing.count,
                target=target,
            )
        progress.start(total=existing.count + target, initial=existing.count)

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        control = RunControl()
        statuses = {signal.SIGINT: ExitStatus.INTERRUPTED, signal.SIGTERM: ExitStatus.TERMINATED}

        def on_signal(signum: int) -> None:
            if interrupts:  # a second signal: leave now; every written line is whole
                os._exit(128 + interrupts[0])
            interrupts.append(signum)
            control.request_stop(statuses[signal.Signals(signum)])
            reporter.info(
                f"stopping after the pairs in flight (up to {cfg.grace_period:g} s); "
                "press Ctrl-C again to quit at once",
                event="stopping",
                signal=signal.Signals(signum).name,
            )

        for sig in statuses:
            loop.add_signal_handler(sig, on_signal, int(sig))
        try:
            return await agenerate(
                cfg, on_start=on_start, on_result=progress.update, control=control
            )
        finally:
            for sig in statuses:
                loop.remove_signal_handler(sig)

    try:
        result = asyncio.run(run())
    except OutputClosed as exc:
        # `magpie generate -o - | head`: the reader has what it wanted.
        progress.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        partial = getattr(exc, "result", None)
        if partial is not None:
            _report_summary(partial, reporter)
        reporter.info("stdout was closed by its reader; stopped", event="stdout_closed")
        return ExitStatus.OK
    except MagpieError as exc:
        progress.close()
        partial = getattr(exc, "result", None)
        if partial is not None:
            _report_summary(partial, reporter)
        return _report_error(exc, reporter, debug)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, traceback with --debug
        progress.close()
        return _report_error(exc, reporter, debug)
    progress.close()
    _report_summary(result, reporter)
    return result.exit_status


def _categories(text: str | None) -> list[str] | None:
    if not text:
        return None
    from magpie.pipeline.stages.judge import parse_categories

    return parse_categories(text)


def _report_summary(result: Any, reporter: Any) -> None:
    if result.torn_path is not None:
        reporter.info(
            f"a torn last line was moved to {result.torn_path}",
            event="torn",
            path=str(result.torn_path),
        )
    for note in result.notes:
        reporter.info(note, event="note")
    if not result.notes:
        reporter.info(
            result.stats.summary(),
            event="summary",
            exit_status=int(result.exit_status),
            **result.stats.as_dict(),
        )
    for warning in getattr(result, "warnings", ()):
        reporter.warn(warning)


def _report_error(exc: BaseException, reporter: Any, debug: bool) -> ExitStatus:
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, MagpieError):
        reporter.error(str(exc), exit_status=int(exc.exit_status))
        return exc.exit_status
    first = (str(exc).strip().splitlines() or [""])[0]
    reporter.error(f"{exc.__class__.__name__}: {first} (run with --debug for a traceback)")
    return ExitStatus.ERROR


# --------------------------------------------------------------------------- filter
@app.command("filter")
def filter_cmd(
    input: str = typer.Argument(..., help="magpie JSONL to filter."),
    output: str = typer.Option(
        ..., "-o", "--output", help="Where kept records go (appended; resumable)."
    ),
    rejects: str | None = typer.Option(
        None, "--rejects", help="Where rejected records go, with reasons."
    ),
    judge: str | None = typer.Option(None, "--judge", help="Judge model (Ollama name or .gguf)."),
    judge_backend: str | None = typer.Option(
        None, "--judge-backend", help="auto, ollama, openai or embedded."
    ),
    host: str | None = typer.Option(
        None, "--host", "--judge-host", help="Ollama URL of the judge."
    ),
    judge_prompt: Path | None = typer.Option(
        None, "--judge-prompt", help="Judge system prompt file."
    ),
    min_quality: str | None = typer.Option(None, "--min-quality", help="very poor .. excellent"),
    min_difficulty: str | None = typer.Option(
        None, "--min-difficulty", help="very easy .. very hard"
    ),
    min_response_score: int | None = typer.Option(None, "--min-response-score", help="1-10"),
    categories: str | None = typer.Option(
        None, "--categories", help="Comma-separated categories to keep."
    ),
    drop_unsafe: bool | None = typer.Option(None, "--drop-unsafe", show_default=False),
    language: str | None = typer.Option(
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
    config: Path | None = typer.Option(None, "--config", help="TOML or YAML settings file."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Judge and rule-filter an existing magpie JSONL (streaming, resumable)."""
    from magpie.cli.report import Reporter

    reporter = Reporter(quiet=quiet)
    flags: dict[str, Any] = {
        "output": output,
        "rejects": rejects,
        "judge": judge,
        "judge_backend": judge_backend,
        "judge_host": host,
        "judge_prompt": str(judge_prompt) if judge_prompt else None,
        "min_quality": min_quality,
        "min_difficulty": min_difficulty,
        "min_response_score": min_response_score,
        "drop_unsafe": drop_unsafe,
        "filters": {"language": language},
        "concurrency": concurrency,
        "overwrite": overwrite,
        "timeout": timeout,
        "max_retries": max_retries,
    }
    try:
        flags["categories"] = _categories(categories)
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
        raise typer.Exit(int(_report_error(exc, reporter, debug))) from None
    st = result.stats
    rej = ", ".join(f"{k} {v}" for k, v in sorted(st.rejected.items()))
    reporter.info(
        f"{st.written} kept, {st.rejected_total} rejected"
        + (f" ({rej})" if rej else "")
        + f", {result.skipped} already done, {result.judged} judged, {result.reused} tags reused",
        event="summary",
    )
    raise typer.Exit(int(control.stop_status) if control.stopped else 0)


# --------------------------------------------------------------------------- dedup
@app.command()
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
    embedder = None
    try:
        from magpie.commands.dedup import dedup_file
        from magpie.pipeline.stages.dedup.index import DedupIndex

        opts, embedder = _semantic_options(
            semantic_model, semantic_threshold, semantic_backend, semantic_host, dedup=True
        )
        index = DedupIndex(threshold=threshold, **opts)
        counts = dedup_file(input, output, rejects=rejects, index=index, overwrite=overwrite)
        if output != STDIO:
            index.save(output)  # a later top-up of this file starts from this index
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    finally:
        if embedder is not None:
            embedder.close()
    if not quiet:
        semantic = f", {counts.semantic} semantic" if embedder is not None else ""
        err(
            f"magpie: {counts.kept} kept, {counts.duplicates} duplicates dropped "
            f"({counts.exact} exact, {counts.near} near{semantic}) of {counts.total}"
        )


def _semantic_options(
    model: str | None,
    threshold: float | None,
    backend: str | None,
    host: str | None,
    *,
    dedup: bool,
) -> tuple[dict[str, Any], Any]:
    """The DedupIndex options of semantic dedup for ``dedup`` and ``merge``
    (flags over MAGPIE_SEMANTIC_*), and the embedder behind them (None: off).
    Bad settings fail here (exit 2); the server is reached at the first embedding."""
    from magpie.pipeline.stages.dedup.embeddings import make_embedder
    from magpie.settings import semantic_config

    cfg = semantic_config(
        {
            "semantic_model": model,
            "semantic_threshold": threshold,
            "semantic_backend": backend,
            "semantic_host": host,
            "dedup": dedup,
        }
    )
    if not cfg.semantic_model:
        return {}, None
    embedder = make_embedder(cfg.semantic_spec(), cfg.retry)
    opts = {
        "embed": embedder,
        "embed_name": cfg.semantic_model,
        "semantic_threshold": cfg.semantic_threshold,
    }
    return opts, embedder


# --------------------------------------------------------------------------- merge
@app.command()
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
        from magpie.commands.merge import merge_files

        opts, embedder = _semantic_options(
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


# --------------------------------------------------------------------------- stats
@app.command()
def stats(
    input: str = typer.Argument(..., help="magpie JSONL (its manifest is read when present)."),
    rejects: Path | None = typer.Option(None, "--rejects", help="Rejects file of the same runs."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON on stdout."),
    html: Path | None = typer.Option(
        None, "--html", help="Write a self-contained HTML report with charts."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --html file."),
    debug: Debug = False,
) -> None:
    """Counts, reject reasons, judge tags, lengths, tokens per pair and throughput."""
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
        data = compute_stats(Path(input), rejects=rejects)
        if html is not None:
            write_html(data, html)
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    for note in data.notes:
        err(f"magpie: note: {note}")
    if as_json:
        out(to_json(data))
    else:
        render_rich(data, _stdout_console())
    if html is not None:
        err(f"magpie: wrote {html}")


# --------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    host: str | None = typer.Option(None, "--host", help="Ollama URL."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Ollama model name or a .gguf file."
    ),
    backend: str | None = typer.Option(None, "--backend", help="auto, ollama, openai or embedded."),
    template: str | None = typer.Option(
        None, "--template", "-t", help="Template family, auto or a file."
    ),
    system: str | None = typer.Option(None, "--system", help="System prompt for the pre-query."),
    config: Path | None = typer.Option(None, "--config", help="TOML or YAML settings file."),
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

        flags = {
            "host": host,
            "model": model,
            "backend": backend,
            "template": template,
            "system": system,
        }
        cfg = build_config(flags, config_file=config)
        checks = asyncio.run(run_doctor(cfg))
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    if as_json:
        out(checks_to_json(checks))
    else:
        from rich.console import Console

        render_checks(checks, Console(stderr=True))
    raise typer.Exit(int(doctor_exit_status(checks)))


# --------------------------------------------------------------------------- templates
@templates_app.command("list")
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


@templates_app.command("show")
def templates_show(
    name: str = typer.Argument(..., help="Family name or alias, or a template TOML file."),
    system: str | None = typer.Option(None, "--system", help="Render with this system prompt."),
    debug: Debug = False,
) -> None:
    """Show a family's exact strings (JSON-escaped)."""
    try:
        from magpie.templates import get_family, load_family_file

        fam = (
            load_family_file(name)
            if (name.endswith(".toml") or os.sep in name)
            else get_family(name)
        )
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


# --------------------------------------------------------------------------- export
@app.command()
def export(
    input: str = typer.Argument(..., help="magpie JSONL file, or - for stdin."),
    format: str = typer.Option(..., "--format", "-f", help="openai, sharegpt, alpaca or dpo."),
    output: str = typer.Option("-", "-o", "--output", help="Output JSONL file, or - for stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert a magpie JSONL to the formats Axolotl, LLaMA-Factory and TRL read."""
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


def _silence_stdout() -> None:
    """The reader of stdout went away (``magpie stats | head``): send what is
    still buffered to /dev/null, so that exiting does not fail on it."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def out(line: str) -> None:
    """One line of data on stdout; a reader gone away ends the command, exit 0."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(int(ExitStatus.OK)) from None


def _stdout_console(**kwargs: Any) -> Any:
    """A Rich console on stdout that exits 0 when its reader goes away (Rich's
    own exits 1)."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            _silence_stdout()
            raise typer.Exit(0)

    return StdoutConsole(**kwargs)


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its clean-up runs (the
    temporary file of an output is removed) before exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors too are one line, exit 2.

    SIGTERM ends a command like Ctrl-C does (generate and filter stop
    gracefully through their own handlers; the file commands unwind, removing
    their temporary files), with exit 143."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:  # typer >= 0.29 vendors click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc  # type: ignore[no-redef]

    try:
        rv = app(args=argv, prog_name="magpie", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(_flush_stdout() or exc.exit_code)
    except click_exc.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        err(f"magpie: error: {exc.format_message()}{where}")
        sys.exit(int(ExitStatus.USAGE))
    except typer.Exit as exc:
        failed = _flush_stdout()
        sys.exit(failed if failed is not None and not exc.exit_code else exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(int(ExitStatus.INTERRUPTED))
    except Terminated:
        sys.exit(int(ExitStatus.TERMINATED))
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(int(ExitStatus.OK))
    except OSError as exc:  # stdout on a full disk (`--help > /dev/full`), ...
        line, status = os_error_line(exc)
        err(f"magpie: error: {line}")
        _silence_stdout()
        sys.exit(int(status))
    failed = _flush_stdout()
    sys.exit(failed if failed is not None else rv if isinstance(rv, int) else 0)
