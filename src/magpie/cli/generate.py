"""``magpie generate``: the flags, the progress bar, signals, the summary.

Each parameter named after a setting is its option (see :mod:`magpie.cli.options`):
adding a setting is one ``RunConfig`` field and one parameter here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from magpie.cli.options import (
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
    switched_off,
)
from magpie.cli.report import report_error, report_summary
from magpie.cli.terminal import fail
from magpie.errors import ExitStatus, MagpieError, OutputClosed


def generate(
    ctx: typer.Context,
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
        None,
        "--model",
        "-m",
        help="Ollama model name, a .gguf file (embedded), or the served model id (openai).",
    ),
    host: list[str] | None = typer.Option(
        None,
        "--host",
        metavar="<url>",
        help="Server URL (default $OLLAMA_HOST or http://127.0.0.1:11434; with --backend openai "
        "$OPENAI_BASE_URL or http://127.0.0.1:8000, a /v1 path or https as the server has it); "
        "repeat it to spread the work over several servers.",
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
    instruction_min_p: float | None = typer.Option(
        None,
        "--instruction-min-p",
        help="Instruction min-p: drop tokens less likely than this times the top one "
        "(default: not sent; the server's own).",
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
    response_min_p: float | None = typer.Option(
        None, "--response-min-p", help="Response min-p (default: not sent)."
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
    reasoning: str | None = typer.Option(
        None,
        "--reasoning",
        help="A reasoning model's thinking: keep (in the record's reasoning field), "
        "drop, or off (ask the model not to think) (default keep).",
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
    filters_language: str | None = typer.Option(
        None, "--language", help="Keep only instructions in this language (ISO 639-1, e.g. en)."
    ),
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="Judge model (a model name on --judge-backend, or a .gguf), or 'same' for the "
        "generator.",
    ),
    judge_backend: JudgeBackend = None,
    judge_host: str | None = typer.Option(
        None, "--judge-host", help="URL of the judge's server (default: --host)."
    ),
    judge_prompt: Path | None = typer.Option(
        None, "--judge-prompt", help="Judge system prompt file (see configs/judge/)."
    ),
    prejudge: bool | None = typer.Option(
        None,
        "--prejudge",
        help="Judge each instruction before its response is generated (saves response tokens).",
        show_default=False,
    ),
    min_quality: MinQuality = None,
    min_difficulty: MinDifficulty = None,
    min_response_score: MinResponseScore = None,
    categories: str | None = typer.Option(
        None,
        "--categories",
        callback=empty_is_unset,
        help='Comma-separated task categories to keep, e.g. "Math,Coding & Debugging".',
    ),
    guard: str | None = typer.Option(
        None,
        "--guard",
        help="A Llama Guard style safety model (e.g. llama-guard3) that classifies each "
        "instruction and response; verdicts go into the record.",
    ),
    drop_unsafe: bool | None = typer.Option(
        None,
        "--drop-unsafe",
        help="Reject pairs the judge or the guard calls unsafe.",
        show_default=False,
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
    num_ctx: int | None = typer.Option(
        None,
        "--num-ctx",
        help="The model's context in tokens: Ollama's num_ctx, the embedded backend's "
        "context (default 4096); an OpenAI-compatible server sets its own at start.",
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
    balance: bool | None = typer.Option(
        None,
        "--balance",
        help="Keep the judge's task categories near an even spread (needs --judge; "
        "with --prejudge over-quota instructions cost no response).",
        show_default=False,
    ),
    personas: str | None = typer.Option(
        None,
        "--personas",
        help="Draw a persona per record: a built-in set (everyday) or a file, one per line "
        "or JSONL with a persona field.",
    ),
    persona_template: str | None = typer.Option(
        None,
        "--persona-template",
        help="How a persona enters the system prompt: text with {persona} and {system}.",
    ),
    topics: str | None = typer.Option(
        None,
        "--topics",
        help="Draw a topic per record: a built-in set (general) or a file, one per line "
        "or JSONL with a topic field.",
    ),
    topic_template: str | None = typer.Option(
        None,
        "--topic-template",
        help="How a topic enters the system prompt: text with {topic} and {system}.",
    ),
    dedup: bool | None = typer.Option(
        None,
        "--no-dedup",
        callback=switched_off,
        help="Keep near-duplicate instructions (dedup is on by default).",
        show_default=False,
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
    flags = given_settings(ctx)
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
        cfg = build_config(flags, config_file=config_file)
    except MagpieError as exc:
        return report_error(exc, reporter, debug)
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
            report_summary(partial, reporter)
        reporter.info("stdout was closed by its reader; stopped", event="stdout_closed")
        return ExitStatus.OK
    except MagpieError as exc:
        progress.close()
        partial = getattr(exc, "result", None)
        if partial is not None:
            report_summary(partial, reporter)
        return report_error(exc, reporter, debug)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, traceback with --debug
        progress.close()
        return report_error(exc, reporter, debug)
    progress.close()
    report_summary(result, reporter)
    return result.exit_status
