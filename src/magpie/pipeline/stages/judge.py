"""The LLM judge: one structured call per pair, validated by pydantic.

The judge model answers with JSON constrained to a JSON schema (Ollama
``format``; a llama.cpp grammar for the embedded backend), then the reply is
validated.  A reply that fails validation is asked again once, with the
validation error; if it fails again the record is rejected as
``judge_invalid``, never kept with empty tags.

The judged text is wrapped in markers that carry a hash of the text, so the
text cannot close its own marker, and the system prompt tells the judge to
ignore instructions inside them.

A conversation of ``--turns T`` is judged once, whole, as the reference tags
its multi-turn sets once per conversation (it tags the first turn only): one
call with every turn between its own markers, one set of tags (the user's
requests together as the instruction, the answers together as the response,
so a weak later turn lowers them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magpie.backends.base import Backend, Sampling
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import UsageError
from magpie.pipeline.stages.base import Instruction, Stage
from magpie.records import (
    CATEGORIES,
    DIFFICULTY_ORDER,
    QUALITY_ORDER,
    Category,
    Difficulty,
    JudgeTags,
    Message,
    Quality,
    Record,
    Rejection,
)
from magpie.templates.injection import check_placeholders, check_prompt_text


class InstructionVerdict(BaseModel):
    """What the judge says about an instruction."""

    model_config = ConfigDict(extra="forbid")

    input_quality: Quality
    input_quality_explanation: str = Field(max_length=600)
    difficulty: Difficulty
    intent: str = Field(max_length=400)
    knowledge: str = Field(max_length=400)
    task_category: Category
    other_categories: list[Category] = Field(default_factory=list, max_length=3)
    safety: Literal["safe", "unsafe"]
    safety_reason: str = Field("", max_length=400)
    language: str = Field(min_length=2, max_length=3, pattern=r"^[a-z]{2,3}$")


class ResponseVerdict(BaseModel):
    """What the judge says about a response."""

    model_config = ConfigDict(extra="forbid")

    response_score: int = Field(ge=1, le=10)
    response_reason: str = Field(max_length=600)


class PairVerdict(InstructionVerdict, ResponseVerdict):
    """Instruction and response, judged in one call."""


class JudgeInvalid(Exception):
    """The judge's reply failed validation twice."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def _prompt_file(name: str) -> str:
    return resources.files("magpie.prompts").joinpath(name).read_text("utf-8")


#: The placeholders a judge prompt may hold.
JUDGE_PROMPT_SLOTS = ("response_rubric",)


def read_prompt_file(path: str | Path) -> str:
    """A user's judge system prompt (``--judge-prompt FILE``), read and
    checked as every user text that reaches a prompt is (exit 2): no template
    token or role header, no placeholder but ``{response_rubric}``."""
    p = Path(path).expanduser()
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read judge prompt {p}: {why}") from None
    what = f"--judge-prompt {p}"
    check_placeholders(what, text, known=JUDGE_PROMPT_SLOTS)
    return check_prompt_text(what, text)


def load_system_prompt(path: str | Path | None = None, *, with_response: bool = True) -> str:
    """The judge's system prompt (the packaged one, or a user file with the same
    ``{response_rubric}`` slot)."""
    text = _prompt_file("judge_system.txt") if path is None else read_prompt_file(path)
    rubric = _prompt_file("judge_response_rubric.txt") if with_response else ""
    return text.replace("{response_rubric}", rubric)


def _marker(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


def delimit(label: str, text: str) -> str:
    """``text`` between markers that carry its hash: it cannot close them itself."""
    tag = f"{label} {_marker(text)}"
    return f"<<<BEGIN {tag}>>>\n{text}\n<<<END {tag}>>>"


def user_message(instruction: str, response: str | None) -> str:
    parts = ["Rate the instruction" + (" and the response" if response is not None else "") + "."]
    parts.append(delimit("INSTRUCTION", instruction))
    if response is not None:
        parts.append(delimit("RESPONSE", response))
    return "\n\n".join(parts)


def conversation_message(messages: Sequence[Message]) -> str:
    """The user message of a conversation's judging: how to rate it, then each
    turn's request and answer between their own markers."""
    users = sum(m.role == "user" for m in messages)
    parts = [
        f"Rate this conversation of {users} user turns as one: the user's requests "
        "together as the instruction (input_quality, difficulty, intent, knowledge, "
        "task_category, safety, language of the conversation as a whole) and the "
        "assistant's answers together as the response (a weak, wrong or unsafe "
        "answer in any turn lowers the rating)."
    ]
    turn = 0
    for m in messages:
        if m.role == "user":
            turn += 1
            parts.append(delimit(f"INSTRUCTION TURN {turn}", m.content))
        elif m.role == "assistant":
            parts.append(delimit(f"RESPONSE TURN {turn}", m.content))
    return "\n\n".join(parts)


def judge_sampling() -> Sampling:
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=768)


class Judge:
    """Tags instructions and pairs with a judge model behind any backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        system_prompt: str | Path | None = None,
        sampling: Sampling | None = None,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.sampling = sampling or judge_sampling()
        self._prompt_path = system_prompt
        self._system_pair = load_system_prompt(system_prompt, with_response=True)
        self._system_instruction = load_system_prompt(system_prompt, with_response=False)
        self.calls = 0
        self.invalid = 0
        #: Replies that failed validation and were asked again (also reported
        #: to ``on_retry`` as ``judge_reask``: the run's retries by cause).
        self.reasks = 0

    @property
    def model(self) -> str:
        return self.backend.model

    def messages(self, instruction: str, response: str | None) -> list[dict[str, str]]:
        system = self._system_pair if response is not None else self._system_instruction
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": user_message(instruction, response)},
        ]

    async def _ask(
        self, schema_model: type[BaseModel], messages: list[dict[str, str]]
    ) -> BaseModel:
        schema = schema_model.model_json_schema()
        reply = ""
        for attempt in range(2):
            self.calls += 1
            asked = messages
            completion = await call_with_retry(
                lambda asked=asked: self.backend.chat(
                    asked, sampling=self.sampling, seed=0, json_schema=schema
                ),
                self.retry,
                self.on_retry,
            )
            reply = completion.text
            try:
                return _validate(schema_model, reply)
            except ValidationError as exc:
                if attempt == 1:
                    self.invalid += 1
                    raise JudgeInvalid(_short_errors(exc), reply) from None
                self.reasks += 1
                if self.on_retry is not None:
                    self.on_retry("judge_reask")
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply},
                    {
                        "role": "user",
                        "content": "That reply does not match the schema: "
                        f"{_short_errors(exc)}. Reply again with one JSON object that "
                        f"matches this schema exactly: {json.dumps(schema)}",
                    },
                ]
        raise AssertionError("unreachable")

    async def judge_instruction(self, instruction: str) -> InstructionVerdict:
        verdict = await self._ask(InstructionVerdict, self.messages(instruction, None))
        return verdict  # type: ignore[return-value]

    async def judge_pair(self, instruction: str, response: str) -> PairVerdict:
        verdict = await self._ask(PairVerdict, self.messages(instruction, response))
        return verdict  # type: ignore[return-value]

    async def judge_conversation(self, messages: Sequence[Message]) -> PairVerdict:
        """The tags of a whole conversation (``--turns``), in one call."""
        asked = [
            {"role": "system", "content": self._system_pair},
            {"role": "user", "content": conversation_message(messages)},
        ]
        verdict = await self._ask(PairVerdict, asked)
        return verdict  # type: ignore[return-value]

    async def judge_record(self, record: Record) -> PairVerdict:
        """The tags of a record: its pair, or its whole conversation."""
        if sum(m.role == "user" for m in record.messages) > 1:
            return await self.judge_conversation(record.messages)
        return await self.judge_pair(record.instruction, record.response)

    async def judge_response(self, instruction: str, response: str) -> ResponseVerdict:
        messages = self.messages(instruction, response)
        verdict = await self._ask(ResponseVerdict, messages)
        return verdict  # type: ignore[return-value]

    def tags(self, *verdicts: BaseModel) -> JudgeTags:
        data: dict[str, object] = {}
        for v in verdicts:
            data.update(v.model_dump())
        return JudgeTags(judge_model=self.model, **data)


def _validate(schema_model: type[BaseModel], reply: str) -> BaseModel:
    """Validate a judge reply; keys the schema does not know are ignored (a
    server without constrained decoding may add some)."""
    try:
        data = json.loads(reply)
    except ValueError:
        return schema_model.model_validate_json(reply)  # raises a ValidationError
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k in schema_model.model_fields}
    return schema_model.model_validate(data)


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "reply"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Thresholds(BaseModel):
    """What a judged record must reach to be kept."""

    model_config = ConfigDict(extra="forbid")

    min_quality: Quality | None = None
    min_difficulty: Difficulty | None = None
    min_response_score: int | None = Field(None, ge=1, le=10)
    categories: list[Category] | None = None
    drop_unsafe: bool = False

    @property
    def needs_instruction(self) -> bool:
        return bool(self.min_quality or self.min_difficulty or self.categories or self.drop_unsafe)

    def instruction_reason(self, v: InstructionVerdict | JudgeTags) -> str | None:
        """A reject reason from the instruction's tags, or None."""
        if (
            self.min_quality
            and v.input_quality is not None
            and QUALITY_ORDER.index(v.input_quality) < QUALITY_ORDER.index(self.min_quality)
        ):
            return "low_quality"
        if (
            self.min_difficulty
            and v.difficulty is not None
            and DIFFICULTY_ORDER.index(v.difficulty) < DIFFICULTY_ORDER.index(self.min_difficulty)
        ):
            return "too_easy"
        if self.categories and v.task_category not in self.categories:
            return "category"
        if self.drop_unsafe and v.safety == "unsafe":
            return "unsafe"
        return None

    def response_reason(self, v: ResponseVerdict | JudgeTags) -> str | None:
        if (
            self.min_response_score is not None
            and v.response_score is not None
            and v.response_score < self.min_response_score
        ):
            return "low_response_score"
        return None


def _judge_reject(record: Record, reason: str, detail: str = "") -> Rejection:
    """A judged record that is not kept: the rejection carries the whole record."""
    return Rejection(
        index=record.index,
        reason=reason,
        stage="judge",
        text=record.instruction,
        detail=detail,
        record=record,
    )


class JudgeStage(Stage):
    """The judge as a stage: with ``prejudge`` the instruction before its
    response is generated (a second, cheaper call), then the pair (or each
    sampled answer of a preference pair); below ``thresholds``, rejected."""

    def __init__(self, judge: Judge, thresholds: Thresholds, *, prejudge: bool = False) -> None:
        self.judge = judge
        self.thresholds = thresholds
        self.prejudge = prejudge

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        if not self.prejudge or candidate.turn > 1:  # a conversation is judged whole
            return candidate
        text = candidate.text
        try:
            verdict = await self.judge.judge_instruction(text)
        except JudgeInvalid as exc:
            return Rejection(
                index=candidate.index,
                reason="judge_invalid",
                stage="judge",
                text=text,
                detail=str(exc),
            )
        reason = self.thresholds.instruction_reason(verdict)
        if reason is not None:
            return Rejection(index=candidate.index, reason=reason, stage="instruction", text=text)
        candidate.verdict = verdict
        return candidate

    async def on_pair(self, candidate: Instruction, record: Record) -> Record | Rejection:
        if record.responses:
            return await self._judge_samples(record)
        return await self._judge(record, candidate)

    async def _judge_samples(self, record: Record) -> Record | Rejection:
        """Score each sampled answer; chosen = best, rejected = worst."""
        assert record.responses
        scored = []
        for answer in record.responses:
            try:
                pair = await self.judge.judge_pair(record.instruction, answer)
            except JudgeInvalid as exc:
                return _judge_reject(record, "judge_invalid", str(exc))
            scored.append((pair.response_score, answer, pair))
        best = max(scored, key=lambda t: t[0])
        worst = min(scored, key=lambda t: t[0])
        tags = self.judge.tags(best[2])
        user = Message(role="user", content=record.instruction)
        record = record.model_copy(
            update={
                "response": best[1],
                "messages": [user, Message(role="assistant", content=best[1])],
                "judge": tags,
                "chosen": [user, Message(role="assistant", content=best[1])],
                "rejected": [user, Message(role="assistant", content=worst[1])],
                "score_chosen": best[0],
                "score_rejected": worst[0],
            }
        )
        thresholds = self.thresholds
        reason = thresholds.instruction_reason(tags) or thresholds.response_reason(tags)
        return record if reason is None else _judge_reject(record, reason)

    async def _judge(self, record: Record, inst: Instruction) -> Record | Rejection:
        """Tag a record with the judge; reject it below the thresholds."""
        thresholds = self.thresholds
        prejudged = inst.verdict is not None and record.turns <= 1
        try:
            if record.turns > 1:
                # The whole conversation, once (with --prejudge too: turn 1's
                # verdict spared turns that were not worth answering).
                tags = self.judge.tags(await self.judge.judge_conversation(record.messages))
            elif inst.verdict is not None:
                verdict = await self.judge.judge_response(record.instruction, record.response)
                tags = self.judge.tags(inst.verdict, verdict)
            else:
                pair = await self.judge.judge_pair(record.instruction, record.response)
                tags = self.judge.tags(pair)
        except JudgeInvalid as exc:
            return _judge_reject(record, "judge_invalid", f"{exc} (reply: {exc.reply[:200]!r})")
        record.judge = tags
        reason = None if prejudged else thresholds.instruction_reason(tags)
        reason = reason or thresholds.response_reason(tags)
        return record if reason is None else _judge_reject(record, reason)


def parse_categories(text: str | None) -> list[str] | None:
    """``--categories "Math,Coding & Debugging"`` -> validated labels."""
    if not text:
        return None
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    lookup = {c.lower(): c for c in CATEGORIES}
    out = []
    for c in wanted:
        if c.lower() not in lookup:
            raise UsageError(f"unknown category {c!r}; known: {', '.join(CATEGORIES)}")
        out.append(lookup[c.lower()])
    return out
