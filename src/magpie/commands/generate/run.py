"""A generation run: :func:`agenerate` checks, opens, writes until the output
holds ``num`` records, and closes everything whatever the end was."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magpie.backends.base import Backend
from magpie.commands.generate.checks import Checked, check_run
from magpie.commands.generate.opening import (
    Prepared,
    Stages,
    concurrency_for,
    open_stages,
    prepare,
)
from magpie.commands.generate.topup import (
    TopUp,
    end_manifest,
    read_top_up,
    start_manifest,
    update_manifest,
)
from magpie.errors import ExitStatus, MagpieError, UsageError
from magpie.pipeline.counters import RunStats
from magpie.pipeline.scheduler import CONTEXT_OVERFLOW, Pipeline, check_samples_per_request
from magpie.pipeline.stages.balance import CategoryBalance
from magpie.pipeline.stages.filters import build_answer_filters, build_filters
from magpie.records import Record, Rejection
from magpie.settings import RunConfig
from magpie.store.jsonl import ExistingOutput, JsonlWriter, RejectsWriter
from magpie.store.manifest import Manifest, RunEntry, write_manifest

#: Rewrite the manifest after this many results (records or rejections), or
#: after ``MANIFEST_MAX_AGE`` seconds, but never twice within
#: ``MANIFEST_MIN_INTERVAL`` seconds (a fast run would otherwise spend its event
#: loop on json and fsync); always at the start and at the end of a run.
MANIFEST_EVERY = 50
MANIFEST_MAX_AGE = 30.0
MANIFEST_MIN_INTERVAL = 1.0


@dataclass
class RunControl:
    """Lets a caller (the CLI's signal handlers) stop a run cleanly."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: The exit status a stopped run reports (130 for SIGINT, 143 for SIGTERM).
    stop_status: ExitStatus = ExitStatus.INTERRUPTED

    def request_stop(self, status: ExitStatus = ExitStatus.INTERRUPTED) -> None:
        if not self.stop.is_set():
            self.stop_status = status
            self.stop.set()

    @property
    def stopped(self) -> bool:
        return self.stop.is_set()


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
    next_index: int = 0
    notes: list[str] = field(default_factory=list)
    #: Things the user should act on, printed after the summary.
    warnings: list[str] = field(default_factory=list)
    error: MagpieError | None = None


async def agenerate(
    config: RunConfig,
    *,
    on_start: Callable[[Prepared, ExistingOutput, int], None] | None = None,
    on_result: Callable[[Record | Rejection, RunStats], None] | None = None,
    control: RunControl | None = None,
    stats: RunStats | None = None,
    prepared: Prepared | None = None,
) -> RunResult:
    """Generate until the output holds ``config.num`` records (top-up semantics).

    Errors that end the run (backend gone for longer than the budget, retries
    exhausted, every instruction rejected) are raised after the records written
    so far are flushed and the manifest records the failure; ``result`` is then
    attached to the exception as ``exc.result``.
    """
    checked = check_run(config, prepared.steering if prepared is not None else "load")
    with checked.targets.claim():  # the output's and --rejects' locks, for the whole run
        return await _agenerate(config, checked, on_start, on_result, control, stats, prepared)


async def _agenerate(
    config: RunConfig,
    checked: Checked,
    on_start: Callable[[Prepared, ExistingOutput, int], None] | None,
    on_result: Callable[[Record | Rejection, RunStats], None] | None,
    control: RunControl | None,
    stats: RunStats | None,
    prepared: Prepared | None,
) -> RunResult:
    path = checked.path
    top = read_top_up(config, path)
    stats = stats or RunStats()
    stats.existing = top.existing.count
    result = RunResult(stats=stats, output=path, seed=top.seed, next_index=top.start_index)
    if top.corrupt is not None:
        result.warnings.append(
            f"the manifest was unreadable: moved to {top.corrupt} and started anew"
        )
    if top.target == 0:
        result.notes.append(
            f"{path} already holds {top.existing.count} records (asked for {config.num}): "
            "nothing to do"
        )
        return result

    prep = prepared or await prepare(
        config, on_retry=lambda cause: stats.retries.update([cause]), checked=checked
    )
    backend, pre_query = prep.backend, prep.pre_query
    try:
        check_samples_per_request(backend, config.samples_per_request)
    except UsageError:
        await backend.aclose()
        raise
    result.backend, result.model, result.template = backend.name, backend.model, pre_query.name
    settings = config.pipeline_settings(concurrency_for(config, backend))
    stages = await open_stages(config, backend, path, top.fresh, stats)
    pipeline = Pipeline(
        backend,
        pre_query,
        seed=top.seed,
        settings=settings,
        stats=stats,
        filters=build_filters(config.filters),
        answer_filters=build_answer_filters(config.filters),
        judge=stages.judge,
        dedup=stages.dedup,
        systems=prep.systems,
        steering=prep.steering,
        balance=(
            CategoryBalance(
                config.num, config.categories, config.balance_tolerance, top.existing.categories
            )
            if config.balance
            else None
        ),
        guard=stages.guard,
    )
    writer = JsonlWriter(path, overwrite=config.overwrite, existing=top.existing)
    rejects = RejectsWriter(Path(config.rejects)) if config.rejects else None
    manifest: Manifest | None = None
    entry: RunEntry | None = None
    try:
        if path is not None:
            manifest, entry = start_manifest(config, path, top, prep, settings)
        result.torn_path = writer.prepare()
        if on_start is not None:
            on_start(prep, top.existing, top.target)
        await _write(
            config, pipeline, top, writer, rejects, stages, manifest, entry, on_result, control
        )
        if control is not None and control.stopped:
            result.exit_status = control.stop_status
    except MagpieError as exc:
        result.error = exc
        result.exit_status = exc.exit_status
        exc.result = result  # type: ignore[attr-defined]
        raise
    except BaseException:
        result.exit_status = ExitStatus.ERROR
        raise
    finally:
        # Every step runs whatever the one before did (a full disk must not
        # leave the backend's connections open or the manifest behind).
        await _close(config, result, pipeline, top, backend, writer, rejects, stages)
        if manifest is not None and entry is not None:
            end_manifest(
                manifest, entry, stats, pipeline, top.existing, result.exit_status, result.error
            )
            _best_effort(result, lambda: write_manifest(path, manifest), "the manifest")
    return result


async def _write(
    config: RunConfig,
    pipeline: Pipeline,
    top: TopUp,
    writer: JsonlWriter,
    rejects: RejectsWriter | None,
    stages: Stages,
    manifest: Manifest | None,
    entry: RunEntry | None,
    on_result: Callable[[Record | Rejection, RunStats], None] | None,
    control: RunControl | None,
) -> None:
    """Write the pipeline's results as they come: records to the output,
    rejections to the rejects file, the counts to the manifest now and then."""
    stats, path, model = pipeline.stats, writer.path, pipeline.backend.model
    stop = control.stop if control is not None else None
    since_manifest = 0
    last_manifest = time.monotonic()
    # Closed before the clean-up, whatever ends the loop: its attempts in
    # flight are cancelled while the backend is still open.
    results = pipeline.run(top.target, top.start_index, stop=stop, grace=config.grace_period)
    async with contextlib.aclosing(results):
        async for item in results:
            if isinstance(item, Record):
                try:
                    writer.write(item)
                except BaseException:
                    if stages.dedup is not None:
                        stages.dedup.discard(item.id)  # never remember a record the file lacks
                    raise
                stats.written += 1
                stats.add_instruction(item.instruction)
            elif rejects is not None:
                rejects.write(item, model=model, seed=top.seed)
            if on_result is not None:
                on_result(item, stats)
            since_manifest += 1
            age = time.monotonic() - last_manifest
            if (
                manifest is not None
                and (since_manifest >= MANIFEST_EVERY or age > MANIFEST_MAX_AGE)
                and age >= MANIFEST_MIN_INTERVAL
            ):
                update_manifest(manifest, entry, stats, pipeline, top.existing)
                write_manifest(path, manifest)  # type: ignore[arg-type]
                since_manifest, last_manifest = 0, time.monotonic()


async def _close(
    config: RunConfig,
    result: RunResult,
    pipeline: Pipeline,
    top: TopUp,
    backend: Backend,
    writer: JsonlWriter,
    rejects: RejectsWriter | None,
    stages: Stages,
) -> None:
    """The end of a run: the files closed, the dedup cache saved, the backends
    closed, and what the run left to say."""
    stats, path = pipeline.stats, result.output
    pairs_per_host = getattr(backend, "pairs", None)
    if pairs_per_host:
        stats.per_host = dict(pairs_per_host)
    writer.close()
    if rejects is not None:
        _best_effort(result, rejects.close, "the rejects file")
    dedup = stages.dedup
    if dedup is not None and path is not None and path.exists():
        _best_effort(result, lambda: dedup.save(path), "the dedup cache (rebuilt next run)")
    await stages.aclose(backend)
    result.next_index = pipeline.next_index
    for warning in (
        no_system_warning(pipeline, stats, bool(config.systems)),
        overflow_warning(pipeline, stats),
    ):
        if warning is not None:
            result.warnings.append(warning)


def _best_effort(result: RunResult, step: Callable[[], object], what: str) -> None:
    """Run a clean-up step; a system error becomes a warning, not a new error
    that hides the run's own (a full disk fails every write at the end)."""
    try:
        step()
    except OSError as exc:
        result.warnings.append(f"could not write {what}: {exc.strerror or exc}")


#: Reject reasons of an instruction that is no user request at all.
_NOT_A_REQUEST = ("empty", "truncated", "special_token", "role_leak", "repetition")


def no_system_warning(pipeline: Pipeline, stats: RunStats, has_systems: bool) -> str | None:
    """A warning for a run without a system prompt whose instructions mostly
    came out as no request at all (code, fragments, text run to the token
    limit): a model imported ``FROM`` a GGUF file gets Ollama's generic template
    and no SYSTEM, and small models need their default system prompt."""
    if has_systems or pipeline.pre_query.system is not None or stats.attempts < 10:
        return None
    bad = sum(stats.rejected[r] for r in _NOT_A_REQUEST)
    if bad * 2 < stats.attempts:
        return None
    return (
        f"{bad} of {stats.attempts} instructions were no request ("
        + ", ".join(f"{r} {stats.rejected[r]}" for r in _NOT_A_REQUEST if stats.rejected[r])
        + f") and the pre-query of {pipeline.backend.model!r} has no system prompt: pass "
        '--system "You are a helpful assistant." or give the model a SYSTEM line in its '
        "Modelfile (`ollama show --modelfile MODEL`)"
    )


def overflow_warning(pipeline: Pipeline, stats: RunStats) -> str | None:
    """How to raise the context, when prompts that did not fit it were
    frequent (a tenth of the attempts or more): the server refused them (magpie
    asks it to refuse rather than cut), so those pairs are missing."""
    n = stats.rejected[CONTEXT_OVERFLOW]
    last = pipeline.overflow
    if not n or last is None or n * 10 < stats.attempts:
        return None
    return (
        f"{n} of {stats.attempts} attempts were rejected as {CONTEXT_OVERFLOW}: a prompt did "
        f"not fit the model's context (last: {last.message}); {last.fix or 'raise it'}"
    )


def generate(config: RunConfig, **kwargs: Any) -> RunResult:
    """Synchronous wrapper of :func:`agenerate`."""
    return asyncio.run(agenerate(config, **kwargs))
