"""A safety classifier on each exchange: a Llama Guard style model (``--guard
MODEL``, e.g. Ollama's ``llama-guard3``) reads each user turn, then its answer.

The guard model's own chat template builds its classification prompt (Ollama's
``llama-guard3`` template holds the hazard taxonomy and the instructions), so
magpie sends the conversation as chat messages: ``[user]`` to classify the
instruction, ``[user, assistant]`` to classify the response.  A later turn of
``--turns`` is classified the same way with the conversation before it
(``[user, assistant, ..., user]``, then with its answer): Llama Guard rates the
last message of the conversation it is given, in that context.  The model
answers ``safe``, or ``unsafe`` and a line of hazard categories (``S1,S10``).
The verdicts of turns 2..T go into ``guard.turns`` of the record.

The answer is parsed strictly: anything else (other words, an unknown category,
an empty reply) raises :class:`GuardInvalid`, and the pair is rejected as
``guard_invalid`` with the reply in the reject's detail, never recorded with a
missing verdict.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from magpie.backends.base import Backend, Completion, Sampling
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import MagpieError
from magpie.pipeline.stages.base import Instruction, Stage
from magpie.records import GuardTags, GuardTurn, GuardVerdict, Message, Record, Rejection

#: The MLCommons hazard taxonomy as Llama Guard 3 numbers it.
HAZARDS: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
#: Greedy and short: a verdict is a word and a line of categories.
GUARD_SAMPLING = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=24)

_VERDICT = re.compile(r"(safe|unsafe)(?:\s*\n\s*(S\d{1,2}(?:\s*,\s*S\d{1,2})*))?")


class GuardInvalid(MagpieError):
    """The guard's reply is no verdict."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def parse_verdict(reply: str) -> GuardVerdict:
    """``safe`` | ``unsafe\\nS1[,S2...]`` (surrounding whitespace allowed) into a
    verdict; anything else raises :class:`GuardInvalid`."""
    m = _VERDICT.fullmatch(reply.strip())
    if m is None:
        raise GuardInvalid(f"the guard's reply is no verdict: {reply.strip()[:200]!r}", reply)
    verdict, cats = m.group(1), m.group(2)
    if verdict == "safe":
        return GuardVerdict(verdict="safe")
    if not cats:
        raise GuardInvalid("the guard said unsafe without a hazard category", reply)
    categories = [c.strip() for c in cats.split(",")]
    unknown = [c for c in categories if c not in HAZARDS]
    if unknown:
        raise GuardInvalid(f"the guard named unknown hazard categories: {unknown}", reply)
    return GuardVerdict(verdict="unsafe", categories=list(dict.fromkeys(categories)))


class Guard:
    """Classifies instructions and responses with a guard model's backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry

    @property
    def model(self) -> str:
        return self.backend.model

    async def classify(self, messages: list[dict[str, str]]) -> GuardVerdict:
        """The verdict on the last message of a conversation, read in its context."""
        completion: Completion = await call_with_retry(
            lambda: self.backend.chat(messages, sampling=GUARD_SAMPLING, seed=0),
            self.retry,
            self.on_retry,
        )
        return parse_verdict(completion.text)

    async def instruction(self, instruction: str) -> GuardVerdict:
        return await self.classify([{"role": "user", "content": instruction}])

    async def response(self, instruction: str, response: str) -> GuardVerdict:
        return await self.classify(
            [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        )

    async def check_instruction(
        self, index: int, text: str, drop_unsafe: bool, history: Sequence[Message] = ()
    ) -> GuardVerdict | Rejection:
        """The verdict on a user turn (after the conversation ``history``), or
        its rejection: ``guard_invalid``, or with ``drop_unsafe`` ``guard_unsafe``
        (before its response costs anything)."""
        try:
            verdict = await self.classify([*_plain(history), {"role": "user", "content": text}])
        except GuardInvalid as exc:
            return Rejection(
                index=index,
                reason="guard_invalid",
                stage="guard",
                text=text,
                detail=f"{exc} (reply: {exc.reply[:200]!r})",
            )
        if verdict.verdict == "unsafe" and drop_unsafe:
            return Rejection(
                index=index,
                reason="guard_unsafe",
                stage="guard",
                text=text,
                detail="instruction: " + ",".join(verdict.categories),
            )
        return verdict

    async def check_record(
        self, record: Record, verdict: GuardVerdict, drop_unsafe: bool, turn: int = 1
    ) -> Record | Rejection:
        """The verdict on the record's last answer (the conversation up to it),
        with ``verdict`` on the user turn before it, in ``record.guard``: turn 1's
        as ``instruction``/``response``, a later turn's appended to
        ``guard.turns``; or the record's rejection, as for the instruction."""
        if turn == 1:
            tags = GuardTags(model=self.model, instruction=verdict)
            entry: GuardTags | GuardTurn = tags
        else:
            if record.guard is None:
                raise ValueError(f"turn {turn} of a record without turn 1's guard verdicts")
            entry = GuardTurn(instruction=verdict)
            tags = record.guard.model_copy(update={"turns": [*(record.guard.turns or []), entry]})
        record.guard = tags
        question = next(m.content for m in reversed(record.messages) if m.role == "user")
        try:
            entry.response = await self.classify(_plain(record.messages))
        except GuardInvalid as exc:
            return Rejection(
                index=record.index,
                reason="guard_invalid",
                stage="guard",
                text=question,
                detail=f"{exc} (reply: {exc.reply[:200]!r})",
                record=record,
            )
        if entry.response.verdict == "unsafe" and drop_unsafe:
            return Rejection(
                index=record.index,
                reason="guard_unsafe",
                stage="guard",
                text=question,
                detail="response: " + ",".join(entry.response.categories),
                record=record,
            )
        return record


def _plain(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Roles and texts (a guard classifies what was said, not the reasoning)."""
    return [{"role": m.role, "content": m.content} for m in messages]


class GuardStage(Stage):
    """The guard as a stage: each user turn before its answer is generated,
    then each answer (with ``drop_unsafe``, an unsafe one is rejected)."""

    def __init__(self, guard: Guard, drop_unsafe: bool) -> None:
        self.guard = guard
        self.drop_unsafe = drop_unsafe

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        verdict = await self.guard.check_instruction(
            candidate.index, candidate.text, self.drop_unsafe, candidate.history
        )
        if isinstance(verdict, Rejection):
            return verdict
        candidate.guard = verdict
        return candidate

    async def on_answer(self, candidate: Instruction, record: Record) -> Record | Rejection:
        if candidate.guard is None:
            return record
        return await self.guard.check_record(
            record, candidate.guard, self.drop_unsafe, candidate.turn
        )
