"""Opening what a run talks to: the generator's backend and its pre-query
(:func:`prepare`), then the judge, the guard and the dedup index (:func:`open_stages`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magpie.backends.base import Backend, ModelInfo
from magpie.backends.registry import choose_backend
from magpie.commands.generate.checks import Checked
from magpie.pipeline.counters import RunStats
from magpie.pipeline.scheduler import SystemChoice
from magpie.pipeline.stages.guard import Guard
from magpie.pipeline.stages.judge import Judge
from magpie.pipeline.steering import Steering, render_bases
from magpie.settings import RunConfig
from magpie.templates import PreQuery
from magpie.templates.rendered import aresolve_pre_query


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
    """``--concurrency``, with ``auto`` resolved: the backend's own number."""
    if config.concurrency == "auto":
        return backend.auto_concurrency
    return int(config.concurrency)


async def prepare(
    config: RunConfig,
    on_retry: Callable[[str], None] | None = None,
    checked: Checked | None = None,
) -> Prepared:
    """Choose and open the backend, describe the model, resolve the template.

    ``checked``: what :func:`~magpie.commands.generate.checks.check_run` found
    (its persona and topic lists and system prompt are used, not read again).
    Raises BackendUnavailable / ModelNotFound (exit 3) or UsageError (exit 2).
    """
    choice = await choose_backend(config.generator_spec, on_retry)
    try:
        info = await choice.backend.describe()
        system = checked.system if checked is not None else config.effective_system
        pre_query = await aresolve_pre_query(config.template, choice.backend, info, system)
        # Again, now that the template's own tokens are known (the items: below).
        config.check_prompt_texts(pre_query.forbidden)
        systems = await _system_choices(config, choice.backend, info)
        steering = checked.steering if checked is not None else config.steering()
        if steering is not None:
            bases = [(c.name, c.pre_query.system) for c in systems] if systems else [(None, system)]
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


@dataclass
class Stages:
    """The stages of a run that hold backends or files of their own."""

    judge: Judge | None = None
    #: The judge's backend (the generator's own with ``--judge same``).
    judge_backend: Backend | None = None
    guard: Guard | None = None
    dedup: Any = None
    #: Semantic dedup's embedder (behind ``dedup``).
    embedder: Any = None

    async def aclose(self, generator: Backend) -> None:
        """Close the embedder, the generator, the judge's and the guard's backends."""
        if self.embedder is not None:
            await self.embedder.aclose()
        await generator.aclose()
        if self.judge_backend is not None and self.judge_backend is not generator:
            await self.judge_backend.aclose()
        if self.guard is not None:
            await self.guard.backend.aclose()


async def open_stages(
    config: RunConfig, backend: Backend, path: Path | None, fresh: bool, stats: RunStats
) -> Stages:
    """The judge, the guard and the dedup index of a run (each checked now:
    exit 3 at once when a server is down or lacks the model); on a failure
    everything is closed, ``backend`` too."""
    stages = Stages()
    stages.judge, stages.judge_backend = await _open_judge(config, backend, stats)
    try:
        stages.guard = await _open_guard(config)
        if config.dedup:
            stages.dedup, stages.embedder = await _open_dedup(
                config, path, fresh, backend.name, stats
            )
    except BaseException:
        await stages.aclose(backend)
        raise
    return stages


async def _open_guard(config: RunConfig) -> Guard | None:
    """The guard of a run (``--guard MODEL``), its model checked with ``describe()``."""
    if not config.guard:
        return None
    choice = await choose_backend(config.guard_spec)
    try:
        await choice.backend.describe()
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
