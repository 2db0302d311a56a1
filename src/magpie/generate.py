"""``generate``: the library function behind ``magpie generate``.

>>> from magpie import RunConfig, generate
>>> result = generate(RunConfig(num=10, output="data.jsonl"))   # doctest: +SKIP

The CLI is a thin layer over :func:`agenerate`: it builds the :class:`RunConfig`,
wires a progress bar to ``on_result`` and turns errors into exit codes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from magpie.backends.base import Backend, ModelInfo
from magpie.backends.select import choose_backend
from magpie.config import RunConfig
from magpie.errors import ExitStatus, UsageError
from magpie.output import ExistingOutput, JsonlWriter, check_output_path, scan_output
from magpie.pipeline import Pipeline, PipelineSettings
from magpie.records import Record, Rejection
from magpie.stats import RunStats
from magpie.templates import PreQuery, resolve_pre_query

#: Concurrency ``auto`` picks: the embedded backend decodes one sequence at a
#: time; an Ollama server queues what it cannot run in parallel, and a few
#: requests in flight hide the client's own latency.
AUTO_CONCURRENCY = {"embedded": 1, "ollama": 4}


@dataclass
class RunResult:
    """What a run did."""

    stats: RunStats
    output: Path | None
    backend: str = ""
    model: str = ""
    template: str = ""
    seed: int = 0
    exit_status: ExitStatus = ExitStatus.OK
    torn_path: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A backend opened and a template resolved: everything a run needs."""

    backend: Backend
    info: ModelInfo
    pre_query: PreQuery
    reason: str


def concurrency_for(config: RunConfig, backend: Backend) -> int:
    if config.concurrency == "auto":
        return AUTO_CONCURRENCY.get(backend.name, 1)
    return int(config.concurrency)


async def prepare(config: RunConfig) -> Prepared:
    """Choose and open the backend, describe the model, resolve the template.

    Raises BackendUnavailable / ModelNotFound (exit 3) or UsageError (exit 2).
    """
    choice = await choose_backend(config)
    try:
        info = await choice.backend.describe()
        pre_query = resolve_pre_query(config.template, info, config.system)
    except BaseException:
        await choice.backend.aclose()
        raise
    return Prepared(choice.backend, info, pre_query, choice.reason)


async def agenerate(
    config: RunConfig,
    *,
    on_start: Callable[[Prepared, ExistingOutput, int], None] | None = None,
    on_result: Callable[[Record | Rejection, RunStats], None] | None = None,
    stop: asyncio.Event | None = None,
    stats: RunStats | None = None,
    prepared: Prepared | None = None,
) -> RunResult:
    """Generate until the output holds ``config.num`` records (top-up semantics).

    An existing output file is read first: its valid records count toward
    ``num`` and the run continues its seed and indexes.  ``--overwrite`` starts
    from scratch.  Setting ``stop`` ends the run after the records already
    written; the file stays valid.
    """
    path = check_output_path(config.output)
    existing = (
        scan_output(path) if (path is not None and not config.overwrite) else ExistingOutput(path)
    )
    stats = stats or RunStats()
    stats.existing = existing.count
    target = max(0, config.num - existing.count)
    seed = config.seed if config.seed is not None else existing.seed
    if seed is None:
        seed = secrets.randbelow(2**31 - 1)
    result = RunResult(stats=stats, output=path, seed=seed)
    if target == 0:
        result.notes.append(
            f"{path} already holds {existing.count} records (asked for {config.num}): nothing to do"
        )
        return result

    prep = prepared or await prepare(config)
    backend, pre_query = prep.backend, prep.pre_query
    result.backend, result.model, result.template = backend.name, backend.model, pre_query.name
    settings = PipelineSettings(
        instruction=config.instruction,
        response=config.response,
        extra_stop=config.extra_stop,
        concurrency=concurrency_for(config, backend),
        retry=config.retry,
        keep_truncated=config.keep_truncated,
    )
    pipeline = Pipeline(backend, pre_query, seed=seed, settings=settings, stats=stats)
    writer = JsonlWriter(path, overwrite=config.overwrite, existing=existing)
    try:
        result.torn_path = writer.prepare()
        if on_start is not None:
            on_start(prep, existing, target)
        async for item in pipeline.run(target, start_index=existing.next_index, stop=stop):
            if isinstance(item, Record):
                writer.write(item)
                stats.written += 1
            if on_result is not None:
                on_result(item, stats)
    finally:
        writer.close()
        await backend.aclose()
    return result


def generate(config: RunConfig, **kwargs: object) -> RunResult:
    """Synchronous wrapper of :func:`agenerate`."""
    return asyncio.run(agenerate(config, **kwargs))  # type: ignore[arg-type]


def validate_model_path(config: RunConfig) -> None:
    """Fail early (exit 2) on a --model that names a missing or non-GGUF file."""
    from magpie.backends.embedded import check_gguf
    from magpie.backends.select import looks_like_gguf

    if config.model and config.backend != "ollama" and looks_like_gguf(config.model):
        check_gguf(config.model)


__all__ = ["Prepared", "RunResult", "agenerate", "generate", "prepare", "UsageError"]
