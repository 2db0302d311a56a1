"""The JSONL record schema (one line per instruction/response pair)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from magpie.judge import JudgeTags

SCHEMA_VERSION = 1


class Message(BaseModel):
    """One chat message, OpenAI/TRL conversational format."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class StageInfo(BaseModel):
    """How one stage (instruction or response) was generated, and what it cost."""

    model_config = ConfigDict(extra="forbid")

    temperature: float
    top_p: float
    top_k: int | None = None
    repeat_penalty: float | None = None
    max_tokens: int
    seed: int | None = None
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Record(BaseModel):
    """One instruction/response pair, as written to the output JSONL."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    #: Stable and unique: a hash of model, template text, run seed and index.
    id: str
    #: Attempt index within the run's seed space (rejected attempts leave gaps).
    index: int = Field(ge=0)
    instruction: str
    response: str
    #: ``[{"role": "user", ...}, {"role": "assistant", ...}]``: loadable as-is by
    #: Hugging Face ``datasets`` and TRL's ``SFTTrainer``.
    messages: list[Message]
    model: str
    backend: str
    host: str | None = None
    #: Template family name (or ``gguf-jinja``/file name) and its source.
    template: str
    template_source: str
    #: System prompt rendered into the pre-query, if any (not part of ``messages``).
    system: str | None = None
    instruction_generation: StageInfo
    response_generation: StageInfo
    #: The run seed; per-request seeds are in the stage infos.
    seed: int
    created_at: datetime
    #: LLM-judge tags (``--judge``, ``magpie filter``); absent when not judged.
    judge: JudgeTags | None = None


class Rejection(BaseModel):
    """An attempt that produced no record, and why."""

    index: int
    reason: str
    stage: Literal["instruction", "response", "judge"] = "instruction"
    text: str = ""
    detail: str = ""
    #: The record it would have been (rejected after the response), if any.
    record: Record | None = None


def record_id(model: str, template_text: str, seed: int, index: int) -> str:
    """A stable id: same model, template, seed and index give the same id."""
    h = hashlib.blake2b(digest_size=8)
    for part in (model, template_text, str(seed), str(index)):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def derive_seed(run_seed: int, index: int, stage: str) -> int:
    """A per-request seed from the run seed, the attempt index and the stage.

    Reproducible (same inputs, same seed) while no two requests of a run share a
    seed.  Kept below 2**31 so every server accepts it.
    """
    h = hashlib.blake2b(f"{run_seed}:{index}:{stage}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") % (2**31 - 1)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
