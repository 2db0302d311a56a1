"""What ``magpie stats`` reports (:class:`DataStats` and its parts), the
numbers behind them (percentiles, histograms, ratios) and their formats."""

from __future__ import annotations

import math
import types
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, Field

from magpie.commands.stats.diversity import (
    DiversityStats,
)
from magpie.pipeline.stages.judge import CATEGORIES, DIFFICULTY_ORDER, QUALITY_ORDER
from magpie.records import Record, StageInfo

#: The judge's label sets, in their order (worst / easiest first).
QUALITY_LEVELS = QUALITY_ORDER
DIFFICULTY_LEVELS = DIFFICULTY_ORDER
TASK_CATEGORIES = CATEGORIES
#: Judge ``response_score`` scale shown even when some scores never occur.
SCORE_RANGE = range(1, 11)
#: What a judge section says when no record carries judge tags.
NOT_JUDGED = "not judged"
#: Roughly how many buckets a length histogram has.
TARGET_BUCKETS = 12
#: Percentiles reported for every length distribution.
PERCENTILES = (50, 90)


# ----------------------------------------------------------------------------- model


class Bucket(BaseModel):
    """One histogram bucket: values in ``[lo, hi)``."""

    lo: int
    hi: int
    count: int


class Distribution(BaseModel):
    """Summary of integer values (lengths): extremes, percentiles, histogram."""

    count: int = 0
    min: int | None = None
    p50: int | None = None
    p90: int | None = None
    max: int | None = None
    mean: float | None = None
    buckets: list[Bucket] = Field(default_factory=list)


class LengthStats(BaseModel):
    """Lengths of one text field, in characters and in whitespace-separated words."""

    chars: Distribution = Field(default_factory=Distribution)
    words: Distribution = Field(default_factory=Distribution)


class JudgeStats(BaseModel):
    """Distributions of the optional ``judge`` tags of the records."""

    #: "not judged", "judged N of M" or "judged".
    status: str = NOT_JUDGED
    judged: int = 0
    not_judged: int = 0
    input_quality: dict[str, int] = Field(default_factory=dict)
    difficulty: dict[str, int] = Field(default_factory=dict)
    task_categories: dict[str, int] = Field(default_factory=dict)
    other_categories: dict[str, int] = Field(default_factory=dict)
    #: "not judged" when no record has a ``response_score``.
    response_status: str = NOT_JUDGED
    response_scored: int = 0
    response_scores: dict[int, int] = Field(default_factory=dict)
    response_score_mean: float | None = None
    safety: dict[str, int] = Field(default_factory=dict)
    languages: dict[str, int] = Field(default_factory=dict)
    judge_models: dict[str, int] = Field(default_factory=dict)


class TokenStats(BaseModel):
    """What the kept pairs cost, in tokens."""

    records_prompt: int = 0
    records_completion: int = 0
    records_total: int = 0
    #: Records that carry at least one token count (backends may not report them).
    records_counted: int = 0
    #: Tokens of attempts that produced no record (None: unknown).
    rejected_work: int | None = None
    #: Where ``rejected_work`` comes from: "manifest", "rejects file" or None.
    rejected_work_source: str | None = None
    total: int = 0
    per_kept_pair: float | None = None
    per_kept_pair_records_only: float | None = None


class RunInfo(BaseModel):
    """One manifest run, with its wall time and throughput."""

    started_at: str
    ended_at: str | None = None
    status: str
    exit_status: int | None = None
    requested: int
    existing_before: int
    written: int
    rejected: dict[str, int] = Field(default_factory=dict)
    attempts: int
    retries: int = 0
    tokens: int = 0
    wall_s: float | None = None
    records_per_s: float | None = None


class Throughput(BaseModel):
    """Records per second of wall time, per manifest run and overall."""

    runs: list[RunInfo] = Field(default_factory=list)
    written: int = 0
    #: Sum of the known wall times (runs without an end are left out).
    wall_s: float | None = None
    records_per_s: float | None = None


class ManifestInfo(BaseModel):
    """What the manifest says made the file."""

    path: str
    #: Null in a merged manifest whose inputs differ (``magpie merge --allow-mixed``).
    model: str | None = None
    backend: str | None = None
    host: str | None = None
    model_digest: str | None = None
    template: str | None = None
    seed: int | None = None
    magpie_version: str
    records: int


class DataStats(BaseModel):
    """Everything ``magpie stats`` reports about one file."""

    path: str
    rejects_path: str | None = None
    manifest: ManifestInfo | None = None
    #: Valid record lines (the kept pairs).
    records: int = 0
    #: Lines that are not records (a torn last line, foreign JSON).
    invalid_lines: int = 0
    #: Records whose id already appeared earlier in the file.
    duplicate_ids: int = 0
    kept: int = 0
    #: Rejections by reason, the two sources merged (see the module docstring).
    rejected: dict[str, int] = Field(default_factory=dict)
    rejected_total: int = 0
    rejected_manifest: dict[str, int] | None = None
    rejected_file: dict[str, int] | None = None
    rejects_invalid_lines: int = 0
    #: kept / (kept + rejected), None when nothing was attempted.
    keep_rate: float | None = None
    unique_instructions: int = 0
    unique_share: float | None = None
    #: Rejections whose reason names a duplicate ("duplicate", "near_duplicate"...).
    duplicates_rejected: int = 0
    #: Records whose normalized instruction already appeared earlier in the file.
    duplicate_instructions: int = 0
    #: Records by number of user turns in ``messages``.
    turns: dict[int, int] = Field(default_factory=dict)
    instruction_length: LengthStats = Field(default_factory=LengthStats)
    response_length: LengthStats = Field(default_factory=LengthStats)
    judge: JudgeStats = Field(default_factory=JudgeStats)
    tokens: TokenStats = Field(default_factory=TokenStats)
    throughput: Throughput | None = None
    models: dict[str, int] = Field(default_factory=dict)
    templates: dict[str, int] = Field(default_factory=dict)
    backends: dict[str, int] = Field(default_factory=dict)
    diversity: DiversityStats = Field(default_factory=DiversityStats)
    #: What the numbers cannot include, said on stderr by ``magpie stats``
    #: (an unreadable manifest, lines of the rejects file that are no rejects).
    notes: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------- numbers


def percentile(counts: Mapping[int, int], p: int) -> int | None:
    """Nearest-rank percentile of values given as ``{value: occurrences}``."""
    n = sum(counts.values())
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))  # ceil(p * n / 100) in integers
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    return max(counts)  # pragma: no cover - unreachable


def nice_width(span: int, target: int = TARGET_BUCKETS) -> int:
    """A bucket width from the 1-2-5 series giving about ``target`` buckets."""
    raw = span / target
    if raw <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 5, 10):
        if step * magnitude >= raw:
            return int(step * magnitude)
    return int(10 * magnitude)  # pragma: no cover - the loop always returns


def histogram(counts: Mapping[int, int], target: int = TARGET_BUCKETS) -> list[Bucket]:
    """Equal-width buckets from min to max (empty buckets included)."""
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    width = nice_width(hi - lo + 1, target)
    start = lo // width * width
    tallies = [0] * ((hi - start) // width + 1)
    for value, n in counts.items():
        tallies[(value - start) // width] += n
    return [
        Bucket(lo=start + i * width, hi=start + (i + 1) * width, count=c)
        for i, c in enumerate(tallies)
    ]


def distribution(counts: Mapping[int, int]) -> Distribution:
    """Summarize ``{value: occurrences}``."""
    n = sum(counts.values())
    if n == 0:
        return Distribution()
    return Distribution(
        count=n,
        min=min(counts),
        p50=percentile(counts, 50),
        p90=percentile(counts, 90),
        max=max(counts),
        mean=round(sum(v * c for v, c in counts.items()) / n, 3),
        buckets=histogram(counts),
    )


def normalize_instruction(text: str) -> str:
    """Casefolded, whitespace-collapsed text: what counts as "the same" instruction."""
    return " ".join(text.casefold().split())


def ratio(num: float, den: float, digits: int = 4) -> float | None:
    return round(num / den, digits) if den else None


def _ordered(counter: Counter[str], levels: Iterable[str]) -> dict[str, int]:
    """Known levels first in their order (zeros included), then the others by count."""
    out = {level: counter.get(level, 0) for level in levels}
    for key, n in counter.most_common():
        out.setdefault(key, n)
    return out


def _by_count(counter: Counter[str], known: Iterable[str] = ()) -> dict[str, int]:
    """Most common first; ``known`` names appear with 0 when absent."""
    full = Counter({k: 0 for k in known})
    full.update(counter)
    return dict(sorted(full.items(), key=lambda kv: (-kv[1], kv[0])))


#: A step of a path into a record: a key, or ``EACH`` (every item of a list,
#: every value of a dict).
EACH = None
KeyPath = tuple[str | None, ...]


def _paths_to(annotation: Any, target: type[BaseModel], path: KeyPath = ()) -> list[KeyPath]:
    """The paths of every ``target`` in a value of ``annotation`` (read from the
    record model's annotations, so that a field added later is found too)."""
    if annotation is target:
        return [path]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return [p for a in args for p in _paths_to(a, target, path)]
    if origin is list:
        return _paths_to(args[0], target, (*path, EACH))
    if origin is dict:
        return _paths_to(args[1], target, (*path, EACH))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [
            p
            for name, f in annotation.model_fields.items()
            for p in _paths_to(f.annotation, target, (*path, name))
        ]
    return []


#: Where a record holds a stage's generation info: turn 1's two stages and
#: every stage of turns 2.. (``turn_generations``).
STAGE_PATHS: tuple[KeyPath, ...] = tuple(_paths_to(Record, StageInfo))


def _at(value: Any, path: KeyPath) -> Iterator[Any]:
    """The values at ``path`` in a record's JSON data (none where it has none)."""
    if not path:
        yield value
        return
    step, rest = path[0], path[1:]
    if step is EACH:
        items = value.values() if isinstance(value, Mapping) else value
        for item in items if isinstance(value, Mapping | list) else ():
            yield from _at(item, rest)
    elif isinstance(value, Mapping) and step in value:
        yield from _at(value[step], rest)


def _stage_infos(obj: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every stage's generation info in a record (see :data:`STAGE_PATHS`)."""
    for path in STAGE_PATHS:
        for info in _at(obj, path):
            if isinstance(info, Mapping):
                yield info


def _tokens(obj: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of every stage of a record, every turn's
    (missing counts are 0)."""
    prompt = completion = 0
    for info in _stage_infos(obj):
        prompt += _int(info.get("prompt_tokens"))
        completion += _int(info.get("completion_tokens"))
    return prompt, completion


def _has_tokens(obj: Mapping[str, Any]) -> bool:
    """Whether a record carries any token count at all."""
    return any(
        info.get("prompt_tokens") is not None or info.get("completion_tokens") is not None
        for info in _stage_infos(obj)
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


# ----------------------------------------------------------------------------- formats


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
