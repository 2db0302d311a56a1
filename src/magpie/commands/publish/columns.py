"""The Parquet schema of records and rejects, and rows in it.

A fixed schema (not one inferred per batch), so that every shard of a
streamed export has the same columns whatever fields its records leave
empty.  The preference columns (``chosen``, ``rejected`` and their scores)
are present only when some record holds a pair: TRL reserves those names, and
a column of nulls would confuse its format check as schema 1 did.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from magpie.records import JudgeTags, Record, StageInfo

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_STAGE = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int64()),
        ("repeat_penalty", pa.float64()),
        ("min_p", pa.float64()),
        ("max_tokens", pa.int64()),
        ("seed", pa.int64()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("n", pa.int64()),
        ("choice", pa.int64()),
    ]
)
_JUDGE_TYPES = {"other_categories": pa.list_(pa.string()), "response_score": pa.int64()}
_JUDGE = pa.struct([(name, _JUDGE_TYPES.get(name, pa.string())) for name in JudgeTags.model_fields])
_BASE = [
    ("schema_version", pa.int64()),
    ("id", pa.string()),
    ("index", pa.int64()),
    ("instruction", pa.string()),
    ("response", pa.string()),
    ("messages", MESSAGES),
    ("model", pa.string()),
    ("backend", pa.string()),
    ("host", pa.string()),
    ("template", pa.string()),
    ("template_source", pa.string()),
    ("system", pa.string()),
    ("system_name", pa.string()),
    ("seed", pa.int64()),
    ("created_at", pa.string()),
    ("turns", pa.int64()),
    ("instruction_generation", _STAGE),
    ("response_generation", _STAGE),
    ("judge", _JUDGE),
    #: Turns 2.. as JSON text (a list of ``{"instruction": ..., "response": ...}``).
    ("turn_generations", pa.string()),
    ("responses", pa.list_(pa.string())),
]
_PAIR = [
    ("chosen", MESSAGES),
    ("rejected", MESSAGES),
    ("score_chosen", pa.int64()),
    ("score_rejected", pa.int64()),
]
REJECTS = pa.schema(
    [
        ("index", pa.int64()),
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("text", pa.string()),
        ("detail", pa.string()),
        ("instruction", pa.string()),
        ("response", pa.string()),
    ]
)


def record_schema(pairs: bool) -> pa.Schema:
    """The records' schema; ``pairs``: with the preference columns."""
    return pa.schema(_BASE + (_PAIR if pairs else []))


def _stage(info: StageInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in _STAGE.names}


def record_row(rec: Record, pairs: bool) -> dict[str, Any]:
    """One record as a row of :func:`record_schema`."""
    row: dict[str, Any] = {name: getattr(rec, name) for name, _ in _BASE}
    row["messages"] = [m.model_dump() for m in rec.messages]
    row["created_at"] = rec.created_at.isoformat()
    row["instruction_generation"] = _stage(rec.instruction_generation)
    row["response_generation"] = _stage(rec.response_generation)
    row["judge"] = {name: getattr(rec.judge, name) for name in _JUDGE.names} if rec.judge else None
    turns = rec.turn_generations
    row["turn_generations"] = (
        json.dumps([{k: _stage(v) for k, v in t.items()} for t in turns]) if turns else None
    )
    if pairs:
        for name in ("chosen", "rejected"):
            msgs = getattr(rec, name)
            row[name] = [m.model_dump() for m in msgs] if msgs else None
        row["score_chosen"], row["score_rejected"] = rec.score_chosen, rec.score_rejected
    return row


def reject_row(line: dict[str, Any]) -> dict[str, Any]:
    """One line of a ``--rejects`` file as a row of :data:`REJECTS`."""

    def text(key: str) -> str | None:
        value = line.get(key)
        return value if isinstance(value, str) else None

    index = line.get("index")
    return {
        "index": index if isinstance(index, int) else None,
        "reason": text("reject_reason"),
        "stage": text("reject_stage"),
        "text": text("text"),
        "detail": text("reject_detail"),
        "instruction": text("instruction"),
        "response": text("response"),
    }
