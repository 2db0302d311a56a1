"""One pass over a dataset and its rejects file: the accumulators of
``magpie stats``.  Lines are read leniently (:func:`magpie.store.jsonl.read_objects`):
stats count the lines that are not records instead of refusing the file."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from magpie.commands.stats.diversity import (
    DiversityCounter,
)
from magpie.commands.stats.figures import (
    DIFFICULTY_LEVELS,
    NOT_JUDGED,
    QUALITY_LEVELS,
    SCORE_RANGE,
    TASK_CATEGORIES,
    JudgeStats,
    LengthStats,
    _by_count,
    _has_tokens,
    _ordered,
    _tokens,
    distribution,
    normalize_instruction,
)
from magpie.errors import UsageError
from magpie.store.jsonl import read_objects


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
    for obj in read_objects(path):
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
    for obj in read_objects(path):
        if obj is None:
            acc.invalid += 1
        else:
            acc.add(obj)
    return acc
