"""What a run finds in its output before it starts (the records there, the
seed, the next index: top-up), and the manifest it keeps next to it."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from magpie import __version__
from magpie.commands.generate.opening import Prepared
from magpie.errors import ExitStatus, UsageError
from magpie.pipeline.counters import RunStats
from magpie.pipeline.scheduler import Pipeline, PipelineSettings
from magpie.pipeline.steering import Steering
from magpie.settings import RunConfig
from magpie.store.jsonl import ExistingOutput, scan_output
from magpie.store.manifest import (
    Manifest,
    RunEntry,
    file_sha256,
    read_manifest,
    set_aside_corrupt,
    settle_crashed,
    write_manifest,
)
from magpie.templates.dates import same_pre_query


@dataclass
class TopUp:
    """The output as a run finds it."""

    #: Start the output afresh (stdout, or ``--overwrite``).
    fresh: bool
    existing: ExistingOutput
    previous: Manifest | None
    #: Where an unreadable manifest was moved to.
    corrupt: Path | None
    seed: int
    start_index: int
    #: Records still to write.
    target: int


def read_top_up(config: RunConfig, path: Path | None) -> TopUp:
    """Read the output and its manifest: the records that count toward ``num``
    and the seed and index to go on with (a killed run's manifest is settled)."""
    fresh = path is None or config.overwrite
    existing = ExistingOutput(path) if fresh else scan_output(path)  # type: ignore[arg-type]
    corrupt = set_aside_corrupt(path) if path is not None else None
    previous = None if fresh or path is None else read_manifest(path)
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
    settled = previous is not None and settle_crashed(previous, existing.count, existing.next_index)
    if settled and target == 0:  # the killed run had finished its records: say so now
        write_manifest(path, previous)  # type: ignore[arg-type]
    return TopUp(fresh, existing, previous, corrupt, seed, start_index, target)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_mixed(
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
        # A template that renders today's date (gpt-oss's `currentDate`) is the
        # same template tomorrow: its dates are not compared.
        same = same_pre_query(previous.template or {}, prep.pre_query.model_dump())
        if not same and not problems:
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


#: The settings of a run that say where it writes and how it reports, not how
#: its records were made: left out of the manifest (every other setting is in).
NOT_RECORDED = frozenset({"num", "output", "overwrite", "rejects", "quiet", "allow_mixed"})


def recorded_settings(
    config: RunConfig, settings: PipelineSettings, steering: Steering | None = None
) -> dict[str, Any]:
    """The settings a manifest records (provenance, and the dataset card's
    account of how records were made, judged and kept): every setting of the
    run (derived from :class:`RunConfig`, so a new one is recorded by itself)
    but :data:`NOT_RECORDED`, with what was resolved at start in place of the
    asked-for value (the sampling and concurrency in use, the persona and topic
    lists read, the system prompt set) and the judge's thresholds."""
    recorded = config.model_dump(mode="json", exclude=set(NOT_RECORDED))
    recorded.update(steering.describe() if steering is not None else {})
    recorded.update(
        balance=(
            {"categories": config.categories, "tolerance": config.balance_tolerance}
            if config.balance
            else None
        ),
        instruction=settings.instruction.model_dump(),
        response=settings.response.model_dump(),
        concurrency=settings.concurrency,
        samples_per_request=settings.samples_per_request,
        thresholds=settings.thresholds.model_dump() if config.judge else None,
    )
    return recorded


def start_manifest(
    config: RunConfig, path: Path, top: TopUp, prep: Prepared, settings: PipelineSettings
) -> tuple[Manifest, RunEntry]:
    """Check that this run may add to the file (``--allow-mixed``), then write
    its manifest with a new run entry."""
    digest, model_file = _model_digest(prep, top.previous)
    if not config.allow_mixed:
        check_mixed(path, top.existing, top.previous, prep, digest, config.shard)
    runs = list(top.previous.runs) if top.previous is not None else []
    entry = RunEntry(
        started_at=_now(),
        pid=os.getpid(),
        requested=config.num,
        existing_before=top.existing.count,
        start_index=top.start_index,
        next_index=top.start_index,
        template_dates=prep.pre_query.dates or None,
    )
    backend = prep.backend
    manifest = Manifest(
        output=path.name,
        magpie_version=__version__,
        backend=backend.name,
        host=backend.host,
        model=backend.model,
        model_digest=digest,
        model_file=model_file,
        template=prep.pre_query.model_dump(),
        settings=recorded_settings(config, settings, prep.steering),
        seed=top.seed,
        records=top.existing.count,
        runs=[*runs, entry],
    )
    write_manifest(path, manifest)
    return manifest, entry


def update_manifest(
    manifest: Manifest,
    entry: RunEntry | None,
    stats: RunStats,
    pipeline: Pipeline,
    existing: ExistingOutput,
) -> None:
    """The counts of the run so far, into its manifest (not yet written)."""
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


def end_manifest(
    manifest: Manifest,
    entry: RunEntry,
    stats: RunStats,
    pipeline: Pipeline,
    existing: ExistingOutput,
    status: ExitStatus,
    error: Exception | None,
) -> None:
    """The run's end, into its manifest (not yet written)."""
    update_manifest(manifest, entry, stats, pipeline, existing)
    entry.ended_at = _now()
    entry.exit_status = int(status)
    entry.status = {
        ExitStatus.OK: "done",
        ExitStatus.INTERRUPTED: "interrupted",
        ExitStatus.TERMINATED: "terminated",
    }.get(status, "failed")
    entry.error = str(error) if error is not None else None
