"""The numbers of ``magpie stats``: :func:`compute_stats` streams a file into a
:class:`DataStats` (see the package docstring for the definitions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from magpie.commands.stats.diversity import (
    EMBED_SAMPLE,
    DiversityStats,
    mean_cosine_distance,
)
from magpie.commands.stats.figures import (
    NOT_JUDGED,
    DataStats,
    Distribution,
    ManifestInfo,
    RunInfo,
    Throughput,
    TokenStats,
    _by_count,
    _parse_time,
    fmt,
    histogram,
    pct,
    percentile,
    ratio,
)
from magpie.commands.stats.reading import _read_records, _read_rejects, _Records, _Rejects
from magpie.store.manifest import Manifest, RunEntry, manifest_path, read_manifest
from magpie.store.targets import STDIO

#: The names the renderers and callers take from here.
__all__ = [
    "NOT_JUDGED",
    "DataStats",
    "Distribution",
    "Throughput",
    "compute_stats",
    "fmt",
    "histogram",
    "pct",
    "percentile",
    "ratio",
    "to_json",
]


# ----------------------------------------------------------------------------- manifest


def _run_info(run: RunEntry) -> RunInfo:
    start, end = _parse_time(run.started_at), _parse_time(run.ended_at)
    wall = (end - start).total_seconds() if start and end else None
    return RunInfo(
        started_at=run.started_at,
        ended_at=run.ended_at,
        status=run.status,
        exit_status=run.exit_status,
        requested=run.requested,
        existing_before=run.existing_before,
        written=run.written,
        rejected=dict(run.rejected),
        attempts=run.written + sum(run.rejected.values()),
        retries=sum(run.retries.values()),
        tokens=run.prompt_tokens + run.completion_tokens,
        wall_s=wall,
        records_per_s=ratio(run.written, wall) if wall and wall > 0 else None,
    )


def _throughput(manifest: Manifest) -> Throughput:
    runs = [_run_info(r) for r in manifest.runs]
    timed = [r for r in runs if r.wall_s is not None and r.wall_s > 0]
    wall = sum(r.wall_s or 0.0 for r in timed) if timed else None
    return Throughput(
        runs=runs,
        written=sum(r.written for r in runs),
        wall_s=wall,
        records_per_s=ratio(sum(r.written for r in timed), wall) if wall else None,
    )


def _manifest_info(path: Path, manifest: Manifest) -> ManifestInfo:
    template = manifest.template.get("name") if isinstance(manifest.template, dict) else None
    return ManifestInfo(
        path=str(manifest_path(path)),
        model=manifest.model,
        backend=manifest.backend,
        host=manifest.host,
        model_digest=manifest.model_digest,
        template=template,
        seed=manifest.seed,
        magpie_version=manifest.magpie_version,
        records=manifest.records,
    )


def _manifest_rejected(manifest: Manifest) -> dict[str, int]:
    total: Counter[str] = Counter()
    for run in manifest.runs:
        total.update(run.rejected)
    return dict(total)


# ----------------------------------------------------------------------------- compute


def _merge_rejected(*sources: Mapping[str, int] | None) -> dict[str, int]:
    merged: dict[str, int] = {}
    for source in sources:
        for reason, n in (source or {}).items():
            merged[reason] = max(merged.get(reason, 0), n)
    return dict(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])))


def _token_stats(recs: _Records, manifest: Manifest | None, rejects: _Rejects | None) -> TokenStats:
    records_total = recs.prompt_tokens + recs.completion_tokens
    rejected_work: int | None = None
    source: str | None = None
    if manifest is not None and manifest.runs:
        spent = sum(r.prompt_tokens + r.completion_tokens for r in manifest.runs)
        rejected_work, source = max(0, spent - records_total), "manifest"
    elif rejects is not None:
        rejected_work, source = rejects.tokens, "rejects file"
    total = records_total + (rejected_work or 0)
    known = recs.counted > 0 or rejected_work is not None
    return TokenStats(
        records_prompt=recs.prompt_tokens,
        records_completion=recs.completion_tokens,
        records_total=records_total,
        records_counted=recs.counted,
        rejected_work=rejected_work,
        rejected_work_source=source,
        total=total,
        per_kept_pair=ratio(total, recs.count, 3) if known else None,
        per_kept_pair_records_only=ratio(records_total, recs.count, 3) if recs.counted else None,
    )


def compute_stats(
    path: Path,
    *,
    rejects: Path | None = None,
    embed: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
    embed_name: str | None = None,
) -> DataStats:
    """Statistics of the magpie JSONL ``path`` (``-``: stdin), its manifest and rejects.

    ``embed`` (an embedding function, e.g. a ``BackendEmbedder``) adds the mean
    pairwise cosine distance of (a sample of) the instructions, named ``embed_name``.

    Raises :class:`~magpie.errors.UsageError` (exit 2) when ``path`` or ``rejects``
    cannot be read, or when ``path`` holds lines but no record.
    """
    path = Path(path)
    recs = _read_records(path, EMBED_SAMPLE if embed is not None else 0)
    manifest = None if str(path) == STDIO else read_manifest(path)
    notes = []
    if manifest is None and str(path) != STDIO and manifest_path(path).exists():
        notes.append(
            f"its manifest {manifest_path(path).name} is unreadable: run settings, "
            "throughput and the manifest's reject counts are left out"
        )
    rej = _read_rejects(Path(rejects)) if rejects is not None else None
    if rej is not None and rej.invalid:
        notes.append(f"{rej.invalid} lines of {rejects} are not magpie rejects: not counted")
    from_manifest = _manifest_rejected(manifest) if manifest is not None else None
    from_file = dict(rej.reasons) if rej is not None else None
    rejected = _merge_rejected(from_manifest, from_file)
    rejected_total = sum(rejected.values())
    return DataStats(
        path=str(path),
        rejects_path=str(rejects) if rejects is not None else None,
        manifest=_manifest_info(path, manifest) if manifest is not None else None,
        records=recs.count,
        invalid_lines=recs.invalid,
        duplicate_ids=recs.duplicate_ids,
        kept=recs.count,
        rejected=rejected,
        rejected_total=rejected_total,
        rejected_manifest=from_manifest,
        rejected_file=from_file,
        rejects_invalid_lines=rej.invalid if rej is not None else 0,
        notes=notes,
        keep_rate=ratio(recs.count, recs.count + rejected_total),
        unique_instructions=len(recs.instructions),
        unique_share=ratio(len(recs.instructions), recs.count),
        duplicates_rejected=sum(n for r, n in rejected.items() if "duplicate" in r),
        duplicate_instructions=recs.duplicate_instructions,
        turns=dict(sorted(recs.turns.items())),
        instruction_length=recs.instruction.result(),
        response_length=recs.response.result(),
        judge=recs.judge.result(),
        tokens=_token_stats(recs, manifest, rej),
        throughput=_throughput(manifest) if manifest is not None else None,
        models=_by_count(recs.models),
        templates=_by_count(recs.templates),
        backends=_by_count(recs.backends),
        diversity=_diversity(recs, embed, embed_name),
    )


def _diversity(
    recs: _Records,
    embed: Callable[[list[str]], Sequence[Sequence[float]]] | None,
    name: str | None,
) -> DiversityStats:
    d = recs.diversity.result()
    if embed is not None and len(recs.diversity.sample) >= 2:
        d.mean_cosine_distance = mean_cosine_distance(recs.diversity.sample, embed)
        d.embedding_model, d.embedded = name, len(recs.diversity.sample)
    return d


# ----------------------------------------------------------------------------- JSON


def to_json(stats: DataStats) -> str:
    """The statistics as indented JSON (``DataStats.model_validate_json`` reads it back)."""
    return stats.model_dump_json(indent=2)
