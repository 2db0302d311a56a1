"""A generation run: ``generate`` and ``agenerate``, the library behind ``magpie generate``.

(The module is ``magpie.commands.generate``, not ``magpie.generate``, so that ``from magpie
import generate`` is the function.)

>>> from magpie import RunConfig, generate
>>> result = generate(RunConfig(num=10, output="data.jsonl"))   # doctest: +SKIP

The CLI is a thin layer over :func:`agenerate`: it builds the :class:`RunConfig`,
wires progress and signals to a :class:`RunControl` and turns errors into exit
codes.

A run on a file output:

1. locks the output file (a second run on it, by any name, fails at once, exit 4);
2. reads the output: valid records count toward ``num``; generation continues
   with the file's seed at the next index (top-up);
3. refuses to mix another model or template into the file (``allow_mixed``);
4. writes each record as one line, and ``<output>.manifest.json`` at start, every
   ``MANIFEST_EVERY`` results (at most once a second) and at the end, whatever
   the end was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from magpie import __version__
from magpie.backends.base import Backend, ModelInfo
from magpie.backends.registry import choose_backend
from magpie.backends.retry import call_with_retry
from magpie.errors import ExitStatus, MagpieError, UsageError
from magpie.pipeline.counters import RunStats
from magpie.pipeline.scheduler import (
    Pipeline,
    PipelineSettings,
    SystemChoice,
    check_samples_per_request,
)
from magpie.pipeline.stages.balance import CategoryBalance
from magpie.pipeline.stages.filters import build_filters
from magpie.pipeline.stages.guard import Guard
from magpie.pipeline.stages.judge import Judge
from magpie.pipeline.steering import Steering, render_bases
from magpie.records import Record, Rejection
from magpie.settings import RunConfig
from magpie.store.jsonl import (
    ExistingOutput,
    JsonlWriter,
    RejectsWriter,
    check_output_path,
    check_rejects_path,
    scan_output,
)
from magpie.store.lock import OutputLock
from magpie.store.manifest import (
    Manifest,
    RunEntry,
    file_sha256,
    read_manifest,
    set_aside_corrupt,
    settle_crashed,
    write_manifest,
)
from magpie.templates import PreQuery
from magpie.templates.rendered import aresolve_pre_query

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


@dataclass
class Prepared:
    """A backend opened and a template resolved: everything a run needs."""

    backend: Backend
    info: ModelInfo
    pre_query: PreQuery
    reason: str
    systems: list[SystemChoice] | None = None
    steering: Steering | None = None


def concurrency_for(config: RunConfig, backend: Backend) -> int:
    if config.concurrency == "auto":
        return backend.auto_concurrency
    return int(config.concurrency)


def validate_config(config: RunConfig) -> Path | None:
    """Every check that needs no backend (exit 2), before any work starts."""
    from magpie.backends.llamacpp.model import check_gguf
    from magpie.backends.ollama import validate_host
    from magpie.backends.registry import looks_like_gguf
    from magpie.templates import get_family, load_family_file

    for host in config.hosts:
        if host is not None:
            validate_host(host)
    if (
        config.model
        and config.backend not in ("ollama", "openai")
        and looks_like_gguf(config.model)
    ):
        check_gguf(config.model)
    config.shard_spec  # noqa: B018 - validates --shard
    config.effective_system  # noqa: B018 - validates --system-preset
    if config.responses > 1 and config.turns > 1:
        raise UsageError("--responses K samples the first answer: use it with --turns 1")
    if config.samples_per_request > 1 and config.backend != "openai":
        # Only OpenAI-compatible servers take `n`; refuse before a model loads.
        raise UsageError(
            f"--samples-per-request {config.samples_per_request} needs --backend openai "
            "(a server that honours `n`, e.g. vLLM); the Ollama and embedded backends "
            "take one sample per request"
        )
    if config.system_preset is not None and config.system is not None:
        raise UsageError("pass --system or --system-preset, not both")
    config.validate_semantic()
    if config.systems and (config.system is not None or config.system_preset is not None):
        raise UsageError("a weighted [systems] set replaces --system / --system-preset")
    for spec in (config.systems or {}).values():
        spec.text()
    steering = config.steering()  # a missing or empty --personas / --topics file fails here
    spec = config.template.strip()
    if spec.lower() != "auto":
        fam = (
            load_family_file(spec)
            if spec.endswith((".toml", ".tml")) or "/" in spec or Path(spec).is_file()
            else get_family(spec)
        )
        if config.effective_system is not None or config.systems or steering is not None:
            fam.render(
                config.effective_system or "x"
            )  # a family without a system slot refuses here
    build_filters(config.filters)  # an unknown --language fails here, before a model loads
    if config.balance and config.judge is None:
        raise UsageError("--balance balances the judge's task categories: it needs --judge")
    if config.judge is None and config.judge_backend != "auto":
        raise UsageError(
            f"--judge-backend {config.judge_backend} needs --judge MODEL (or --judge same)"
        )
    path = check_output_path(config.output)
    check_rejects_path(config.rejects, [("output", path)])
    return path


async def prepare(config: RunConfig, on_retry: Callable[[str], None] | None = None) -> Prepared:
    """Choose and open the backend, describe the model, resolve the template.

    Raises BackendUnavailable / ModelNotFound (exit 3) or UsageError (exit 2).
    """
    choice = await choose_backend(config.generator_spec)
    try:
        # 5xx / timeouts at start are retried like any request; a refused
        # connection is not: the server is down, say so at once (exit 3).
        policy = config.retry.model_copy(update={"unreachable_budget": 0.0})
        info = await call_with_retry(choice.backend.describe, policy, on_retry)
        pre_query = await aresolve_pre_query(
            config.template, choice.backend, info, config.effective_system
        )
        systems = await _system_choices(config, choice.backend, info)
        steering = config.steering()
        if steering is not None:
            bases = (
                [(c.name, c.pre_query.system) for c in systems]
                if systems
                else [(None, config.effective_system)]
            )
            await render_bases(
                steering, config.template, choice.backend, info, bases, pre_query.forbidden
            )
    except BaseException:
        await choice.backend.aclose()
        raise
    return Prepared(choice.backend, info, pre_query, choice.reason, systems, steering)


async def _system_choices(
    config: RunConfig, backend: Backend, info: ModelInfo
) -> list[SystemChoice] | None:
    """The weighted system prompts of a run, each rendered into its pre-query."""
    if not config.systems:
        return None
    return [
        SystemChoice(
            name,
            spec.weight,
            await aresolve_pre_query(config.template, backend, info, spec.text()),
        )
        for name, spec in config.systems.items()
    ]


async def _open_guard(config: RunConfig) -> Guard | None:
    """The guard of a run (``--guard MODEL``), its model checked with ``describe()``."""
    if not config.guard:
        return None
    choice = await choose_backend(config.guard_spec)
    try:
        policy = config.retry.model_copy(update={"unreachable_budget": 0.0})
        await call_with_retry(choice.backend.describe, policy)
    except BaseException:
        await choice.backend.aclose()
        raise
    return Guard(choice.backend, retry=config.retry)


async def _open_judge(
    config: RunConfig, backend: Backend, stats: RunStats
) -> tuple[Judge | None, Backend | None]:
    """The judge of a run, if ``--judge`` asks for one (``same``: the generator)."""
    if not config.judge:
        return None, None
    if config.judge.strip().lower() == "same":
        judge_backend = backend
    else:
        from magpie.backends.registry import open_judge_backend

        try:
            judge_backend = await open_judge_backend(config.judge_spec, config.retry)
        except BaseException:
            await backend.aclose()
            raise
    judge = Judge(
        judge_backend,
        system_prompt=config.judge_prompt,
        retry=config.retry,
        on_retry=lambda cause: stats.retries.update([f"judge_{cause}"]),
    )
    return judge, judge_backend


async def _open_dedup(
    config: RunConfig, path: Path | None, fresh: bool, generator: str, stats: RunStats
) -> tuple[Any, Any]:
    """The dedup index of a run (the output's own, when topping up) and, with
    ``semantic_model``, the embedder behind it (probed: exit 3 at once when
    its server is down or lacks the model)."""
    from magpie.pipeline.stages.dedup.index import DedupIndex

    opts: dict[str, Any] = {"threshold": config.dedup_threshold}
    embedder = None
    if config.semantic_model:
        from magpie.pipeline.stages.dedup.embeddings import aopen_embedder

        loop = asyncio.get_running_loop()

        def on_retry(cause: str) -> None:  # called on the embedder's thread
            loop.call_soon_threadsafe(stats.retries.update, [f"embed_{cause}"])

        embedder = await aopen_embedder(config.semantic_spec(generator), config.retry, on_retry)
        opts |= {
            "embed": embedder,
            "embed_name": config.semantic_model,
            "semantic_threshold": config.semantic_threshold,
        }
    try:
        if path is None or fresh:
            return DedupIndex(**opts), embedder
        if embedder is None:
            return DedupIndex.open(path, **opts), embedder
        # A stale cache embeds the old records (in batches, through the sync
        # path): on a worker thread, so this loop stays responsive meanwhile.
        return await asyncio.to_thread(DedupIndex.open, path, **opts), embedder
    except BaseException:
        if embedder is not None:
            await embedder.aclose()
        raise


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_mixed(
    path: Path,
    existing: ExistingOutput,
    previous: Manifest | None,
    prep: Prepared,
    digest: str | None,
    shard: str | None = None,
) -> None:
    """Refuse to add records of another model or template to a file."""
    model, template = prep.backend.model, prep.pre_query.name
    problems = []
    if existing.count and existing.model is not None and existing.model != model:
        problems.append(f"model {existing.model!r} (this run: {model!r})")
    if existing.count and existing.template is not None and existing.template != template:
        problems.append(f"template {existing.template!r} (this run: {template!r})")
    if previous is not None and existing.count:
        if previous.model_digest and digest and previous.model_digest != digest:
            problems.append(f"model digest {previous.model_digest[:19]} (this run: {digest[:19]})")
        old_text = (previous.template or {}).get("text")
        if old_text is not None and old_text != prep.pre_query.text and not problems:
            problems.append("a different pre-query text (system prompt or template)")
    if previous is not None and existing.count:
        now = prep.steering.describe() if prep.steering is not None else {}
        for key in ("personas", "topics"):
            old, new = previous.settings.get(key) or {}, now.get(key) or {}
            if old.get("sha256") != new.get("sha256"):  # type: ignore[union-attr]
                what = f"{old.get('source')} ({old.get('count')})" if old else "none"
                problems.append(
                    f"{key} {what} (this run: "
                    + (f"{new.get('source')} ({new.get('count')}))" if new else "none)")  # type: ignore[union-attr]
                )
    if previous is not None and existing.count and previous.settings.get("shard") != shard:
        problems.append(f"shard {previous.settings.get('shard')} (this run: {shard})")
    if problems:
        raise UsageError(
            f"{path} holds records made with {'; '.join(problems)}: pass --allow-mixed to add "
            "them anyway, or pick another --output"
        )


def _model_digest(
    prep: Prepared, previous: Manifest | None
) -> tuple[str | None, dict[str, Any] | None]:
    path = prep.info.extra.get("path")
    if path:
        info = file_sha256(Path(path), previous.model_file if previous else None)
        return f"sha256:{info['sha256']}", info
    return prep.info.digest, None


def _settings(
    config: RunConfig, settings: PipelineSettings, steering: Steering | None = None
) -> dict[str, Any]:
    return {
        **(steering.describe() if steering is not None else {}),
        "balance": (
            {"categories": config.categories, "tolerance": config.balance_tolerance}
            if config.balance
            else None
        ),
        "instruction": settings.instruction.model_dump(),
        "response": settings.response.model_dump(),
        "extra_stop": settings.extra_stop,
        "keep_truncated": settings.keep_truncated,
        "reasoning": settings.reasoning,
        "guard": config.guard,
        "concurrency": settings.concurrency,
        "max_retries": config.max_retries,
        "timeout": config.timeout,
        "unreachable_budget": config.unreachable_budget,
        "shard": config.shard,
        "samples_per_request": settings.samples_per_request,
        "dedup": config.dedup,
        "dedup_threshold": config.dedup_threshold if config.dedup else None,
        "semantic_model": config.semantic_model if config.dedup else None,
        "semantic_threshold": (
            config.semantic_threshold if config.dedup and config.semantic_model else None
        ),
        # For the dataset card (magpie card): how records were judged and kept.
        "judge": config.judge,
        "thresholds": settings.thresholds.model_dump() if config.judge else None,
        "responses": config.responses,
        "turns": config.turns,
        "system_preset": config.system_preset,
        "systems": (
            {name: spec.model_dump() for name, spec in config.systems.items()}
            if config.systems
            else None
        ),
    }


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
    path = validate_config(config)
    lock = OutputLock(path) if path is not None else None
    if lock is not None:
        lock.acquire()
    try:
        return await _agenerate(config, path, on_start, on_result, control, stats, prepared)
    finally:
        if lock is not None:
            lock.release()


async def _agenerate(
    config: RunConfig,
    path: Path | None,
    on_start: Callable[[Prepared, ExistingOutput, int], None] | None,
    on_result: Callable[[Record | Rejection, RunStats], None] | None,
    control: RunControl | None,
    stats: RunStats | None,
    prepared: Prepared | None,
) -> RunResult:
    fresh = path is None or config.overwrite
    existing = ExistingOutput(path) if fresh else scan_output(path)
    corrupt = set_aside_corrupt(path) if path is not None else None
    previous = None if fresh or path is None else read_manifest(path)
    stats = stats or RunStats()
    stats.existing = existing.count
    target = max(0, config.num - existing.count)
    seed = config.seed if config.seed is not None else existing.seed
    if seed is None and previous is not None:
        seed = previous.seed  # an interrupted run's seed, even if it wrote nothing
    if seed is None:
        seed = secrets.randbelow(2**31 - 1)
    start_index = existing.next_index
    if previous is not None and previous.seed == seed and existing.count:
        # Continue after rejected attempts too, so no request seed repeats.
        for run in reversed(previous.runs):
            if run.next_index is not None:
                start_index = max(start_index, run.next_index)
                break
    result = RunResult(stats=stats, output=path, seed=seed, next_index=start_index)
    if corrupt is not None:
        result.warnings.append(f"the manifest was unreadable: moved to {corrupt} and started anew")
    settled = previous is not None and settle_crashed(previous, existing.count, existing.next_index)
    if settled and target == 0:  # the killed run had finished its records: say so now
        write_manifest(path, previous)  # type: ignore[arg-type]
    if target == 0:
        result.notes.append(
            f"{path} already holds {existing.count} records (asked for {config.num}): nothing to do"
        )
        return result

    prep = prepared or await prepare(config, on_retry=lambda cause: stats.retries.update([cause]))
    backend, pre_query = prep.backend, prep.pre_query
    try:
        check_samples_per_request(backend, config.samples_per_request)
    except UsageError:
        await backend.aclose()
        raise
    result.backend, result.model, result.template = backend.name, backend.model, pre_query.name
    settings = PipelineSettings(
        instruction=config.instruction,
        response=config.response,
        extra_stop=config.extra_stop,
        concurrency=concurrency_for(config, backend),
        retry=config.retry,
        keep_truncated=config.keep_truncated,
        reasoning=config.reasoning,
        thresholds=config.thresholds,
        prejudge=config.prejudge,
        shard_index=config.shard_spec[0],
        shard_count=config.shard_spec[1],
        turns=config.turns,
        responses=config.responses,
        preference_temperature=config.preference_temperature,
        schedule=config.schedule,
        samples_per_request=config.samples_per_request,
    )
    judge, judge_backend = await _open_judge(config, backend, stats)
    guard: Guard | None = None
    try:
        guard = await _open_guard(config)
        dedup, embedder = None, None
        if config.dedup:
            dedup, embedder = await _open_dedup(config, path, fresh, backend.name, stats)
    except BaseException:
        await backend.aclose()
        if judge_backend is not None and judge_backend is not backend:
            await judge_backend.aclose()
        if guard is not None:
            await guard.backend.aclose()
        raise
    pipeline = Pipeline(
        backend,
        pre_query,
        seed=seed,
        settings=settings,
        stats=stats,
        filters=build_filters(config.filters),
        judge=judge,
        dedup=dedup,
        systems=prep.systems,
        steering=prep.steering,
        balance=(
            CategoryBalance(
                config.num, config.categories, config.balance_tolerance, existing.categories
            )
            if config.balance
            else None
        ),
        guard=guard,
    )
    writer = JsonlWriter(path, overwrite=config.overwrite, existing=existing)
    rejects = RejectsWriter(Path(config.rejects)) if config.rejects else None
    manifest: Manifest | None = None
    entry: RunEntry | None = None
    try:
        if path is not None:
            digest, model_file = _model_digest(prep, previous)
            if not config.allow_mixed:
                _check_mixed(path, existing, previous, prep, digest, config.shard)
            runs = list(previous.runs) if previous is not None else []
            entry = RunEntry(
                started_at=_now(),
                pid=os.getpid(),
                requested=config.num,
                existing_before=existing.count,
                start_index=start_index,
                next_index=start_index,
            )
            manifest = Manifest(
                output=path.name,
                magpie_version=__version__,
                backend=backend.name,
                host=backend.host,
                model=backend.model,
                model_digest=digest,
                model_file=model_file,
                template=pre_query.model_dump(),
                settings=_settings(config, settings, prep.steering),
                seed=seed,
                records=existing.count,
                runs=[*runs, entry],
            )
            write_manifest(path, manifest)
        result.torn_path = writer.prepare()
        if on_start is not None:
            on_start(prep, existing, target)
        stop = control.stop if control is not None else None
        since_manifest = 0
        last_manifest = time.monotonic()
        # Closed before the clean-up below, whatever ends the loop: its attempts
        # in flight are cancelled while the backend is still open.
        results = pipeline.run(target, start_index, stop=stop, grace=config.grace_period)
        async with contextlib.aclosing(results):
            async for item in results:
                if isinstance(item, Record):
                    try:
                        writer.write(item)
                    except BaseException:
                        if dedup is not None:
                            dedup.discard(item.id)  # never remember a record the file lacks
                        raise
                    stats.written += 1
                    stats.add_instruction(item.instruction)
                elif rejects is not None:
                    rejects.write(item, model=backend.model, seed=seed)
                if on_result is not None:
                    on_result(item, stats)
                since_manifest += 1
                age = time.monotonic() - last_manifest
                if (
                    manifest is not None
                    and (since_manifest >= MANIFEST_EVERY or age > MANIFEST_MAX_AGE)
                    and age >= MANIFEST_MIN_INTERVAL
                ):
                    _update(manifest, entry, stats, pipeline, existing)
                    write_manifest(path, manifest)  # type: ignore[arg-type]
                    since_manifest, last_manifest = 0, time.monotonic()
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
        pairs_per_host = getattr(backend, "pairs", None)
        if pairs_per_host:
            stats.per_host = dict(pairs_per_host)
        writer.close()
        if rejects is not None:
            _best_effort(result, rejects.close, "the rejects file")
        if dedup is not None and path is not None and path.exists():
            _best_effort(result, lambda: dedup.save(path), "the dedup cache (rebuilt next run)")
        if embedder is not None:
            await embedder.aclose()
        await backend.aclose()
        if judge_backend is not None and judge_backend is not backend:
            await judge_backend.aclose()
        if guard is not None:
            await guard.backend.aclose()
        result.next_index = pipeline.next_index
        warning = no_system_warning(pipeline, stats, bool(config.systems))
        if warning is not None:
            result.warnings.append(warning)
        if manifest is not None and entry is not None:
            _update(manifest, entry, stats, pipeline, existing)
            entry.ended_at = _now()
            entry.exit_status = int(result.exit_status)
            entry.status = {
                ExitStatus.OK: "done",
                ExitStatus.INTERRUPTED: "interrupted",
                ExitStatus.TERMINATED: "terminated",
            }.get(result.exit_status, "failed")
            entry.error = str(result.error) if result.error is not None else None
            _best_effort(result, lambda: write_manifest(path, manifest), "the manifest")
    return result


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


def _update(
    manifest: Manifest,
    entry: RunEntry | None,
    stats: RunStats,
    pipeline: Pipeline,
    existing: ExistingOutput,
) -> None:
    manifest.records = existing.count + stats.written
    if entry is None:
        return
    entry.next_index = pipeline.next_index
    entry.written = stats.written
    entry.rejected = dict(stats.rejected)
    entry.retries = dict(stats.retries)
    entry.prompt_tokens = stats.prompt_tokens
    entry.completion_tokens = stats.completion_tokens
    if stats.per_host:
        entry.pairs_per_host = dict(stats.per_host)  # type: ignore[attr-defined]


def generate(config: RunConfig, **kwargs: Any) -> RunResult:
    """Synchronous wrapper of :func:`agenerate`."""
    return asyncio.run(agenerate(config, **kwargs))


__all__ = [
    "Prepared",
    "RunControl",
    "RunResult",
    "agenerate",
    "generate",
    "prepare",
    "validate_config",
]
