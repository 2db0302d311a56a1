"""The JSONL record schema (one line per instruction/response pair)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# The judge's labels (written by magpie.pipeline.stages.judge).
Quality = Literal["very poor", "poor", "average", "good", "excellent"]
Difficulty = Literal["very easy", "easy", "medium", "hard", "very hard"]
Category = Literal[
    "Information seeking",
    "Reasoning",
    "Planning",
    "Editing",
    "Coding & Debugging",
    "Math",
    "Role playing",
    "Data analysis",
    "Creative writing",
    "Advice seeking",
    "Brainstorming",
    "Others",
]
QUALITY_ORDER: tuple[str, ...] = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_ORDER: tuple[str, ...] = ("very easy", "easy", "medium", "hard", "very hard")
CATEGORIES: tuple[str, ...] = Category.__args__  # type: ignore[attr-defined]


class JudgeTags(BaseModel):
    """The tags stored in a record's ``judge`` field."""

    model_config = ConfigDict(extra="allow")

    input_quality: Quality | None = None
    input_quality_explanation: str | None = None
    difficulty: Difficulty | None = None
    intent: str | None = None
    knowledge: str | None = None
    task_category: Category | None = None
    other_categories: list[Category] = Field(default_factory=list)
    safety: Literal["safe", "unsafe"] | None = None
    safety_reason: str | None = None
    language: str | None = None
    response_score: int | None = None
    response_reason: str | None = None
    judge_model: str


class GuardVerdict(BaseModel):
    """A safety classifier's verdict on one text (``--guard``)."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["safe", "unsafe"]
    #: Hazard categories of an unsafe verdict (Llama Guard's S1..S14).
    categories: list[str] = Field(default_factory=list)


class GuardTurn(BaseModel):
    """The guard's verdicts on one later turn (``--turns``): its user turn, read
    with the conversation before it, and its answer."""

    model_config = ConfigDict(extra="forbid")

    instruction: GuardVerdict
    #: None when the record was rejected on this turn's user verdict.
    response: GuardVerdict | None = None


class GuardTags(BaseModel):
    """The record's ``guard`` field: the guard model's verdicts."""

    model_config = ConfigDict(extra="forbid")

    model: str
    #: Turn 1: the instruction and its answer.
    instruction: GuardVerdict
    #: None when the pair was rejected on the instruction's verdict.
    response: GuardVerdict | None = None
    #: ``--turns T`` > 1: the verdicts of turns 2..T, in order (as the record's
    #: ``turn_generations``); absent from a one-turn record.
    turns: list[GuardTurn] | None = None

    @model_serializer(mode="wrap")
    def _without_unset_turns(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Leave ``turns`` out unless set: one-turn records are written exactly
        as before the field existed."""
        data = handler(self)
        if isinstance(data, dict) and data.get("turns") is None:
            data.pop("turns", None)
        return data


#: 2: ``chosen``/``rejected`` are conversations (TRL's implicit-prompt preference
#: format) with ``score_chosen``/``score_rejected`` beside them, and absent without
#: a pair.  1 held ``{"content", "score"}`` objects there (always, null without a
#: pair): a key TRL reserves holding a non-conversation made its
#: ``is_conversational`` depend on set order, i.e. on ``PYTHONHASHSEED``.
#: Version 1 lines are still read (upgraded in ``Record``'s validator).
SCHEMA_VERSION = 2

#: The keys of a preference pair, left out of a record that has none.
PAIR_FIELDS: tuple[str, ...] = ("chosen", "rejected", "score_chosen", "score_rejected")


class Message(BaseModel):
    """One chat message, OpenAI/TRL conversational format."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    #: An assistant turn's reasoning (``--reasoning keep``), the field TRL and
    #: the Qwen3 / DeepSeek-R1 chat templates read; absent when there is none.
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset_reasoning(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Leave ``reasoning_content`` out unless set: messages without reasoning
        are written exactly as before the field existed."""
        data = handler(self)
        if isinstance(data, dict) and data.get("reasoning_content") is None:
            data.pop("reasoning_content", None)
        return data


class StageInfo(BaseModel):
    """How one stage (instruction or response) was generated, and what it cost."""

    model_config = ConfigDict(extra="forbid")

    temperature: float
    top_p: float
    top_k: int | None = None
    repeat_penalty: float | None = None
    min_p: float | None = None
    max_tokens: int
    seed: int | None = None
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: ``--samples-per-request N`` > 1 (instruction of turn 1 only): the text is
    #: choice ``choice`` of one request for ``n`` samples; ``seed`` is then that
    #: request's seed, shared by the ``n`` attempts of its group.  Absent otherwise.
    n: int | None = None
    choice: int | None = None

    @model_serializer(mode="wrap")
    def _without_unset_n(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Leave ``n``/``choice`` (and ``min_p``) out unless set: records of
        one-sample requests are written exactly as before these fields existed."""
        data = handler(self)
        if isinstance(data, dict):
            for key in ("n", "choice", "min_p"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data


class Preference(NamedTuple):
    """A record's preference pair: the best and the worst answer, their scores."""

    prompt: list[Message]
    chosen: str
    rejected: str
    score_chosen: int | None
    score_rejected: int | None


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 record's ``{"content", "score"}`` pair as version 2 fields."""
    data = dict(data)
    chosen, rejected = data.pop("chosen", None), data.pop("rejected", None)
    if isinstance(chosen, dict) and isinstance(rejected, dict):
        messages = list(data.get("messages") or [])
        prompt = messages[:-1] if messages and _role(messages[-1]) == "assistant" else messages
        if not prompt:
            prompt = [{"role": "user", "content": data.get("instruction", "")}]
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            data[key] = [*prompt, {"role": "assistant", "content": answer.get("content", "")}]
            data[f"score_{key}"] = answer.get("score")
    data["schema_version"] = SCHEMA_VERSION
    return data


def _role(message: object) -> object:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


class Record(BaseModel):
    """One instruction/response pair, as written to the output JSONL."""

    model_config = ConfigDict(extra="allow")

    # Each field's description is its documentation for users: the dataset
    # card's field table (magpie.commands.publish.card) shows it, and a test
    # fails on a field without one.
    schema_version: int = Field(
        SCHEMA_VERSION, description="the record schema's version (read: 1 and 2; written: 2)"
    )
    id: str = Field(
        description="stable and unique: a hash of model, pre-query text, run seed and index"
    )
    index: int = Field(
        ge=0,
        description="the attempt's index in the run's seed space (rejected attempts leave gaps)",
    )
    instruction: str = Field(description="the generated user instruction (turn 1), cleaned")
    response: str = Field(description="the model's answer to it, without its reasoning")
    #: Loadable as-is by Hugging Face ``datasets`` and TRL's ``SFTTrainer``.
    messages: list[Message] = Field(
        description="the conversation in OpenAI/TRL's conversational format: every user "
        "turn and assistant answer (an answer's reasoning in `reasoning_content`)"
    )
    model: str = Field(
        description="the generator model: Ollama model name, GGUF file name or served model id"
    )
    backend: str = Field(description="the backend that ran it: `ollama`, `embedded` or `openai`")
    host: str | None = Field(None, description="the server that answered")
    template: str = Field(
        description="the chat template's family (`llama3`, `gguf-jinja:chatml`, a file's name, ...)"
    )
    template_source: str = Field(
        description="where the template came from: `ollama-render` or `apply-template` "
        "(the server rendered it), `ollama-auto`, `gguf-jinja`, `registry` or `file`"
    )
    system: str | None = Field(
        None,
        description="the system prompt rendered into the pre-query, if any "
        "(not part of `messages`)",
    )
    instruction_generation: StageInfo = Field(
        description="how the instruction was sampled and what it cost: sampling, seed, "
        "finish reason, tokens"
    )
    response_generation: StageInfo = Field(description="the same for the answer (turn 1)")
    seed: int = Field(description="the run seed (each request's seed is in its generation info)")
    created_at: datetime = Field(description="when the record was made (ISO 8601, UTC)")
    judge: JudgeTags | None = Field(
        None,
        description="the LLM judge's tags (`--judge`, `magpie filter`): quality, difficulty, "
        "category, safety, language, the answer's score; absent when not judged",
    )
    turns: int = Field(1, description="the number of user turns in `messages` (`--turns`)")
    turn_generations: list[dict[str, StageInfo]] | None = Field(
        None,
        description="the generation info of turns 2.. (`instruction` and `response` of each; "
        "turn 1's is in the two fields above)",
    )
    system_name: str | None = Field(
        None, description="which named system prompt of a weighted set made the pre-query"
    )
    persona: str | None = Field(
        None,
        description="`--personas`: the persona drawn for this record "
        "(written into `system` through its template)",
    )
    topic: str | None = Field(
        None,
        description="`--topics`: the topic drawn for this record "
        "(written into `system` through its template)",
    )
    #: With a judge, the best and worst of them make the pair below.
    responses: list[str] | None = Field(None, description="`--responses K`: every sampled answer")
    reasoning: str | None = Field(
        None,
        description="the first answer's reasoning (`--reasoning keep` and a model that "
        "reasons); never part of `response`",
    )
    guard: GuardTags | None = Field(
        None,
        description="`--guard`: the safety classifier's verdicts on the instruction and on "
        "the answer (and on each later turn's, in `turns`); absent when no guard ran",
    )
    #: TRL's implicit-prompt preference format (its ``DPOTrainer`` reads them as
    #: they are).  Absent without a pair, so that ``messages`` is then the only
    #: key TRL reserves.
    chosen: list[Message] | None = Field(
        None,
        description="`--responses K --judge`: the conversation ending in the best answer; "
        "absent without a pair",
    )
    rejected: list[Message] | None = Field(
        None,
        description="the conversation ending in the worst answer; absent without a pair",
    )
    score_chosen: int | None = Field(
        None, description="the judge's score of the chosen answer; absent without a pair"
    )
    score_rejected: int | None = Field(
        None, description="the judge's score of the rejected answer; absent without a pair"
    )

    @model_validator(mode="before")
    @classmethod
    def _read_version_1(cls, data: Any) -> Any:
        version = data.get("schema_version", SCHEMA_VERSION) if isinstance(data, dict) else None
        if isinstance(version, int) and version < 2:
            return _upgrade_v1(data)
        return data

    @model_serializer(mode="wrap")
    def _without_unset_pair(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Leave the pair's keys out when there is no pair (see ``SCHEMA_VERSION``)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("chosen") is None:
            for key in PAIR_FIELDS:
                data.pop(key, None)
        return data

    def preference(self) -> Preference | None:
        """The preference pair (None: the record has none)."""
        if not self.chosen or not self.rejected:
            return None
        return Preference(
            prompt=self.chosen[:-1],
            chosen=self.chosen[-1].content,
            rejected=self.rejected[-1].content,
            score_chosen=self.score_chosen,
            score_rejected=self.score_rejected,
        )


class Rejection(BaseModel):
    """An attempt that produced no record, and why."""

    index: int
    reason: str
    #: "request": a request failed after all its retries (reason failed_<cause>),
    #: or its prompt did not fit the model's context (context_overflow).
    stage: Literal["instruction", "response", "judge", "guard", "request"] = "instruction"
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


#: Seed slots per attempt index: instruction and response of up to 8 turns
#: (slots 0-15), then up to 16 sampled responses for preference pairs (16-31).
SEED_SLOTS = 32
SEED_MODULUS = 2**31  # servers take 32-bit seeds; stay below 2**31 for all of them


def stage_slot(stage: str) -> int:
    """``instruction``/``response`` (turn 1), ``instruction:2``/``response:2``, ...,
    ``sample:0`` .. ``sample:15`` (the K answers of ``--responses K``)."""
    name, _, turn = stage.partition(":")
    if name == "sample":
        k = int(turn)
        if not 0 <= k < 16:
            raise ValueError(f"unknown seed stage {stage!r}")
        return 16 + k
    t = int(turn or 1)
    if name not in ("instruction", "response") or not 1 <= t <= SEED_SLOTS // 2:
        raise ValueError(f"unknown seed stage {stage!r}")
    return 2 * (t - 1) + (name == "response")


def derive_seed(run_seed: int, index: int, stage: str) -> int:
    """A per-request seed from the run seed, the attempt index and the stage.

    ``(base + SEED_SLOTS * index + slot) mod 2**31`` with ``base`` a hash of the
    run seed: reproducible, and a bijection of (index, stage), so no two requests
    of a run share a seed for the first 134 million indexes (random 31-bit seeds
    would collide about ten times in a run of 100,000 pairs, and a repeated seed
    on the same pre-query repeats the instruction).  Shards of one run use
    disjoint indexes, hence disjoint seeds.
    """
    h = hashlib.blake2b(f"magpie-seed:{run_seed}".encode(), digest_size=8)
    base = int.from_bytes(h.digest(), "big") % SEED_MODULUS
    return (base + SEED_SLOTS * index + stage_slot(stage)) % SEED_MODULUS


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
