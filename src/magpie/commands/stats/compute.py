"""The numbers of ``magpie stats``: :func:`compute_stats` streams a file into a
:class:`DataStats` (see the package docstring for the definitions)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, Field

from magpie.commands.stats.diversity import (
    EMBED_SAMPLE,
    DiversityCounter,
    DiversityStats,
    mean_cosine_distance,
)
from magpie.errors import UsageError
from magpie.pipeline.stages.judge import CATEGORIES, DIFFICULTY_ORDER, QUALITY_ORDER
from magpie.store.manifest import Manifest, RunEntry, manifest_path, read_manifest
from magpie.store.targets import STDIO, stdin_bytes

if TYPE_CHECKING:  # pragma: no cover
    pass

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


def _tokens(obj: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a record's two stages (missing counts are 0)."""
    prompt = completion = 0
    for stage in ("instruction_generation", "response_generation"):
        info = obj.get(stage)
        if isinstance(info, Mapping):
            prompt += _int(info.get("prompt_tokens"))
            completion += _int(info.get("completion_tokens"))
    return prompt, completion


def _has_tokens(obj: Mapping[str, Any]) -> bool:
    """Whether a record carries any token count at all."""
    return any(
        isinstance(info, Mapping)
        and (info.get("prompt_tokens") is not None or info.get("completion_tokens") is not None)
        for info in (obj.get("instruction_generation"), obj.get("response_generation"))
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


# ----------------------------------------------------------------------------- reading


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` (``-``: stdin), one at a time."""
    if str(path) == STDIO:
        yield from stdin_bytes()
        return
    try:
        fh: BinaryIO = path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a JSONL file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        yield from fh


def _objects(path: Path) -> Iterator[dict[str, Any] | None]:
    """Each non-blank line parsed as a JSON object, or None when it is not one."""
    for raw in _lines(path):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            yield None
            continue
        yield obj if isinstance(obj, dict) else None


def _is_record(obj: dict[str, Any] | None) -> bool:
    return (
        obj is not None
        and isinstance(obj.get("instruction"), str)
        and isinstance(obj.get("response"), str)
    )


class _Lengths:
    """Counters of character and word lengths of one field."""

    def __init__(self) -> None:
        self.chars: Counter[int] = Counter()
        self.words: Counter[int] = Counter()

    def add(self, text: str) -> None:
        self.chars[len(text)] += 1
        self.words[len(text.split())] += 1

    def result(self) -> LengthStats:
        return LengthStats(chars=distribution(self.chars), words=distribution(self.words))


class _Judge:
    """Counters of the judge tags."""

    def __init__(self) -> None:
        self.judged = self.not_judged = 0
        self.fields: dict[str, Counter[str]] = {
            k: Counter()
            for k in (
                "input_quality",
                "difficulty",
                "task_category",
                "safety",
                "language",
                "judge_model",
            )
        }
        self.other: Counter[str] = Counter()
        self.scores: Counter[int] = Counter()
        self.score_sum = 0.0

    def add(self, judge: Any) -> None:
        if not isinstance(judge, Mapping):
            self.not_judged += 1
            return
        self.judged += 1
        for key, counter in self.fields.items():
            value = judge.get(key)
            if isinstance(value, str) and value.strip():
                counter[value.strip()] += 1
        others = judge.get("other_categories")
        if isinstance(others, list):
            self.other.update(o.strip() for o in others if isinstance(o, str) and o.strip())
        score = _score(judge.get("response_score"))
        if score is not None:
            self.scores[round(score)] += 1
            self.score_sum += score

    def result(self) -> JudgeStats:
        total = self.judged + self.not_judged
        if not self.judged:
            return JudgeStats(not_judged=self.not_judged)
        scored = sum(self.scores.values())
        if scored:
            lo, hi = min(min(self.scores), SCORE_RANGE.start), max(max(self.scores), 10)
            scores = {s: self.scores.get(s, 0) for s in range(lo, hi + 1)}
        else:
            scores = {}
        f = self.fields
        return JudgeStats(
            status="judged" if self.judged == total else f"judged {self.judged} of {total}",
            judged=self.judged,
            not_judged=self.not_judged,
            input_quality=_ordered(f["input_quality"], QUALITY_LEVELS),
            difficulty=_ordered(f["difficulty"], DIFFICULTY_LEVELS),
            task_categories=_by_count(f["task_category"], TASK_CATEGORIES),
            other_categories=_by_count(self.other),
            response_status=(
                NOT_JUDGED
                if not scored
                else ("judged" if scored == total else f"judged {scored} of {total}")
            ),
            response_scored=scored,
            response_scores=scores,
            response_score_mean=round(self.score_sum / scored, 3) if scored else None,
            safety=_by_count(f["safety"]),
            languages=_by_count(f["language"]),
            judge_models=_by_count(f["judge_model"]),
        )


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _turns(obj: Mapping[str, Any]) -> int:
    """User turns of a record: user messages in ``messages`` (a plain pair is 1)."""
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return 1
    users = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "user")
    return max(1, users)


class _Records:
    """Everything gathered in one pass over the records."""

    def __init__(self, sample_size: int = 0) -> None:
        self.count = self.invalid = self.duplicate_ids = self.duplicate_instructions = 0
        self.ids: set[str] = set()
        self.instructions: set[bytes] = set()
        self.instruction = _Lengths()
        self.response = _Lengths()
        self.judge = _Judge()
        self.turns: Counter[int] = Counter()
        self.models: Counter[str] = Counter()
        self.templates: Counter[str] = Counter()
        self.backends: Counter[str] = Counter()
        self.diversity = DiversityCounter(sample_size)
        self.prompt_tokens = self.completion_tokens = self.counted = 0

    def add(self, obj: dict[str, Any]) -> None:
        self.count += 1
        rid = obj.get("id")
        if isinstance(rid, str):
            if rid in self.ids:
                self.duplicate_ids += 1
            self.ids.add(rid)
        key = hashlib.blake2b(
            normalize_instruction(obj["instruction"]).encode("utf-8"), digest_size=16
        ).digest()
        if key in self.instructions:
            self.duplicate_instructions += 1
        self.instructions.add(key)
        self.instruction.add(obj["instruction"])
        self.response.add(obj["response"])
        judge = obj.get("judge")
        self.diversity.add(
            obj["instruction"],
            category=judge.get("task_category") if isinstance(judge, dict) else None,
            persona=obj.get("persona"),
            topic=obj.get("topic"),
        )
        self.judge.add(obj.get("judge"))
        self.turns[_turns(obj)] += 1
        for counter, field in (
            (self.models, "model"),
            (self.templates, "template"),
            (self.backends, "backend"),
        ):
            value = obj.get(field)
            if isinstance(value, str):
                counter[value] += 1
        prompt, completion = _tokens(obj)
        self.counted += _has_tokens(obj)
        self.prompt_tokens += prompt
        self.completion_tokens += completion


def _read_records(path: Path, sample_size: int = 0) -> _Records:
    acc = _Records(sample_size)
    for obj in _objects(path):
        if _is_record(obj):
            acc.add(obj)  # type: ignore[arg-type]
        else:
            acc.invalid += 1
    if acc.count == 0 and acc.invalid:
        raise UsageError(
            f"{path} is not a magpie JSONL: none of its {acc.invalid} lines is a record "
            "(with string fields instruction and response)"
        )
    return acc


class _Rejects:
    """Counts of a rejects file."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.invalid = 0
        self.tokens = 0

    def add(self, obj: dict[str, Any]) -> None:
        reason = obj.get("reject_reason") or obj.get("reason") or "unknown"
        self.reasons[str(reason)] += 1
        self.tokens += sum(_tokens(obj))


def _read_rejects(path: Path) -> _Rejects:
    acc = _Rejects()
    for obj in _objects(path):
        if obj is None:
            acc.invalid += 1
        else:
            acc.add(obj)
    return acc


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


# ----------------------------------------------------------------------------- formats


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
