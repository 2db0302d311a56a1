"""The Magpie pipeline: pre-query -> instruction -> clean -> response -> record.

:class:`Pipeline` turns attempt indexes into :class:`~magpie.records.Record` or
:class:`~magpie.records.Rejection` objects.  ``run()`` keeps up to
``concurrency`` attempts in flight and yields results in index order, so a run's
output depends only on its seed (and the model), never on timing: a resumed run
and an uninterrupted one write the same records.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.base import Backend, Completion, Sampling
from magpie.clean import clean_instruction
from magpie.dedup import DedupIndex
from magpie.errors import MagpieError
from magpie.judge import InstructionVerdict, Judge, JudgeInvalid, Thresholds
from magpie.records import (
    Message,
    Record,
    Rejection,
    StageInfo,
    derive_seed,
    record_id,
    utcnow,
)
from magpie.repetition import RepetitionGuard
from magpie.retry import RetryPolicy, call_with_retry
from magpie.stats import RunStats
from magpie.templates import PreQuery

#: An instruction filter returns a reject reason, or None to keep the instruction.
InstructionFilter = Callable[[str], "str | None"]


def default_instruction_sampling() -> Sampling:
    # The reference: temperature 1.0, top_p 1.0, no top-k narrowing.
    return Sampling(temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=512)


def default_response_sampling() -> Sampling:
    # The reference answers greedily.
    return Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=2048)


class PipelineSettings(BaseModel):
    """Library-level settings of the generation pipeline."""

    model_config = ConfigDict(extra="forbid")

    instruction: Sampling = Field(default_factory=default_instruction_sampling)
    response: Sampling = Field(default_factory=default_response_sampling)
    #: Stop strings added to the template's own for instruction requests.
    extra_stop: list[str] = Field(default_factory=list)
    concurrency: int = Field(1, ge=1, le=1024)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    #: Give up when this many attempts in a row were rejected (a template that
    #: does not fit the model would otherwise burn tokens forever).
    max_reject_streak: int = Field(50, ge=1)
    #: Keep responses cut by the token limit (finish reason "length") instead of
    #: rejecting them as ``response_truncated``.
    keep_truncated: bool = False
    #: Stop a generation caught in a loop (the same block repeated) at once and
    #: reject it as ``repetition`` instead of letting it run to max_tokens.
    stop_repetition: bool = True
    #: Judge thresholds (used when the pipeline has a judge).
    thresholds: Thresholds = Field(default_factory=Thresholds)
    #: Judge the instruction before the response is generated (a second, cheaper
    #: call), so instructions below the thresholds cost no response tokens.
    prejudge: bool = False
    #: ``--shard i/N``: this run uses the attempt indexes ``i, i+N, i+2N, ...`` so
    #: N machines sharing one seed write disjoint seeds and ids.
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1)


@dataclass
class Instruction:
    index: int
    text: str
    completion: Completion
    seed: int
    verdict: InstructionVerdict | None = None


def _stage(sampling: Sampling, seed: int, c: Completion) -> StageInfo:
    return StageInfo(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repeat_penalty=sampling.repeat_penalty,
        max_tokens=sampling.max_tokens,
        seed=seed,
        finish_reason=c.finish_reason,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
    )


#: Reject reasons that point at a template that does not fit the model.
_TEMPLATE_REASONS = {"empty", "truncated", "special_token", "role_leak", "repetition"}


def _streak_message(streak: int, stats: RunStats) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in stats.rejected.most_common())
    top = stats.rejected.most_common(1)[0][0] if stats.rejected else ""
    if top in _TEMPLATE_REASONS:
        hint = (
            "the template probably does not fit this model; check --template and --system "
            "(`magpie templates list`)"
        )
    elif top == "judge_invalid":
        hint = "the judge model does not answer with valid JSON; try a larger --judge model"
    else:
        hint = "the filters or judge thresholds reject everything; loosen them"
    return f"the last {streak} attempts were all rejected ({reasons}): {hint}"


class Pipeline:
    """Generate Magpie pairs from one backend with one pre-query template."""

    def __init__(
        self,
        backend: Backend,
        pre_query: PreQuery,
        *,
        seed: int,
        settings: PipelineSettings | None = None,
        stats: RunStats | None = None,
        filters: list[InstructionFilter] | None = None,
        judge: Judge | None = None,
        dedup: DedupIndex | None = None,
    ) -> None:
        self.backend = backend
        self.pre_query = pre_query
        self.seed = seed
        self.settings = settings or PipelineSettings()
        self.stats = stats or RunStats()
        self.filters = list(filters or [])
        self.judge = judge
        #: Near-duplicate index: checked before a response is requested (against
        #: records already emitted) and updated in index order as records are
        #: emitted, so the decisions do not depend on timing.
        self.dedup = dedup
        if judge is not None and judge.on_retry is None:
            judge.on_retry = self._on_retry
            judge.retry = self.settings.retry
        self._stop = list(dict.fromkeys([*pre_query.stop, *self.settings.extra_stop]))
        #: The first attempt index not yet yielded by ``run()``.
        self.next_index = 0

    def _guard(self) -> RepetitionGuard | None:
        return RepetitionGuard() if self.settings.stop_repetition else None

    def _on_retry(self, cause: str) -> None:
        self.stats.retries[cause] += 1

    async def _call(self, fn: Callable[[], object]) -> Completion:
        return await call_with_retry(fn, self.settings.retry, self._on_retry)  # type: ignore[arg-type]

    async def instruction(self, index: int) -> Instruction | Rejection:
        """Stage 1-3: raw completion of the pre-query, then cleaning."""
        sampling = self.settings.instruction
        seed = derive_seed(self.seed, index, "instruction")
        completion = await self._call(
            lambda: self.backend.complete(
                self.pre_query.text,
                sampling=sampling,
                stop=self._stop,
                seed=seed,
                abort=self._guard(),
            )
        )
        self.stats.add_tokens(completion.prompt_tokens, completion.completion_tokens)
        text, reason = clean_instruction(completion, self.pre_query.forbidden)
        for flt in self.filters:
            if reason is not None:
                break
            reason = flt(text)
        if reason is None and self.dedup is not None:
            dup = self.dedup.check(text)
            if dup is not None:
                self._count_saved()
                return Rejection(
                    index=index,
                    reason="duplicate",
                    text=text,
                    detail=f"{dup.kind} duplicate of {dup.of_id} ({dup.similarity:.2f})",
                )
        verdict = None
        if reason is None and self.judge is not None and self.settings.prejudge:
            try:
                verdict = await self.judge.judge_instruction(text)
            except JudgeInvalid as exc:
                reason = "judge_invalid"
                self._count_saved()
                return Rejection(
                    index=index, reason=reason, stage="judge", text=text, detail=str(exc)
                )
            reason = self.settings.thresholds.instruction_reason(verdict)
        if reason is not None:
            self._count_saved()
            return Rejection(index=index, reason=reason, stage="instruction", text=text)
        return Instruction(
            index=index, text=text, completion=completion, seed=seed, verdict=verdict
        )

    def _count_saved(self) -> None:
        """An instruction rejected before its response: count the response
        tokens that were not spent (estimated by the mean so far)."""
        self.stats.saved_responses += 1

    async def response(self, inst: Instruction) -> Record | Rejection:
        """Stage 4-5: answer the instruction with the model's chat template."""
        sampling = self.settings.response
        seed = derive_seed(self.seed, inst.index, "response")
        completion = await self._call(
            lambda: self.backend.chat(
                [{"role": "user", "content": inst.text}],
                sampling=sampling,
                seed=seed,
                abort=self._guard(),
            )
        )
        self.stats.add_tokens(completion.prompt_tokens, completion.completion_tokens)
        self.stats.add_response(completion.completion_tokens)
        answer = completion.text.strip()
        if completion.finish_reason == "abort":
            return Rejection(
                index=inst.index, reason="response_repetition", stage="response", text=inst.text
            )
        if not answer:
            return Rejection(
                index=inst.index, reason="empty_response", stage="response", text=inst.text
            )
        if completion.finish_reason == "length" and not self.settings.keep_truncated:
            return Rejection(
                index=inst.index, reason="response_truncated", stage="response", text=inst.text
            )
        return Record(
            id=record_id(self.backend.model, self.pre_query.text, self.seed, inst.index),
            index=inst.index,
            instruction=inst.text,
            response=answer,
            messages=[
                Message(role="user", content=inst.text),
                Message(role="assistant", content=answer),
            ],
            model=self.backend.model,
            backend=self.backend.name,
            host=completion.host or self.backend.host,
            template=self.pre_query.name,
            template_source=self.pre_query.source,
            system=self.pre_query.system,
            instruction_generation=_stage(self.settings.instruction, inst.seed, inst.completion),
            response_generation=_stage(sampling, seed, completion),
            seed=self.seed,
            created_at=utcnow(),
        )

    async def _judge(self, record: Record, inst: Instruction) -> Record | Rejection:
        """Tag a record with the judge; reject it below the thresholds."""
        assert self.judge is not None
        thresholds = self.settings.thresholds
        try:
            if inst.verdict is not None:
                verdict = await self.judge.judge_response(record.instruction, record.response)
                tags = self.judge.tags(inst.verdict, verdict)
            else:
                pair = await self.judge.judge_pair(record.instruction, record.response)
                tags = self.judge.tags(pair)
        except JudgeInvalid as exc:
            return Rejection(
                index=record.index,
                reason="judge_invalid",
                stage="judge",
                text=record.instruction,
                detail=f"{exc} (reply: {exc.reply[:200]!r})",
                record=record,
            )
        record.judge = tags
        reason = None if inst.verdict is not None else thresholds.instruction_reason(tags)
        reason = reason or thresholds.response_reason(tags)
        if reason is not None:
            return Rejection(
                index=record.index,
                reason=reason,
                stage="judge",
                text=record.instruction,
                record=record,
            )
        return record

    async def attempt(self, index: int) -> Record | Rejection:
        """One full attempt: instruction, then (if kept) its response."""
        inst = await self.instruction(index)
        if isinstance(inst, Rejection):
            return inst
        result = await self.response(inst)
        if self.judge is not None and isinstance(result, Record):
            return await self._judge(result, inst)
        return result

    async def run(
        self,
        target: int,
        start_index: int = 0,
        stop: asyncio.Event | None = None,
        grace: float = 0.0,
    ) -> AsyncIterator[Record | Rejection]:
        """Yield results in index order until ``target`` records were yielded.

        Up to ``concurrency`` attempts run at once.  Setting ``stop`` ends the run
        early: no new attempts start, attempts in flight get ``grace`` seconds to
        finish (those that complete in index order are still yielded), the rest
        are dropped.  ``self.next_index`` is then the first index not yet
        yielded: where a resumed run continues.
        """
        stride, offset = self.settings.shard_count, self.settings.shard_index
        if start_index <= offset:
            start_index = offset
        elif (start_index - offset) % stride:
            start_index += stride - (start_index - offset) % stride  # next index of this shard
        self.next_index = start_index
        if target <= 0:
            return
        loop = asyncio.get_running_loop()
        k = self.settings.concurrency
        window = max(4 * k, 8)
        pending: dict[int, asyncio.Task[Record | Rejection]] = {}
        done: dict[int, Record | Rejection] = {}
        next_index = start_index
        kept = streak = 0
        deadline: float | None = None  # set once stopping: the end of the grace period
        stop_wait = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while kept < target:
                if stop is not None and stop.is_set() and deadline is None:
                    if grace <= 0 or not pending:
                        return
                    deadline = loop.time() + grace
                if deadline is None:
                    potential = (
                        kept + len(pending) + sum(isinstance(r, Record) for r in done.values())
                    )
                    while (
                        len(pending) < k
                        and potential < target
                        and (next_index - self.next_index) // stride < window
                    ):
                        pending[next_index] = asyncio.ensure_future(self.attempt(next_index))
                        next_index += stride
                        potential += 1
                waits: list[asyncio.Future[object]] = list(pending.values())  # type: ignore[arg-type]
                if stop_wait is not None and deadline is None:
                    waits.append(stop_wait)
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                finished, _ = await asyncio.wait(
                    waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for idx, task in list(pending.items()):
                    if task in finished:
                        del pending[idx]
                        done[idx] = task.result()  # re-raises a failed attempt
                while self.next_index in done:
                    result = done.pop(self.next_index)
                    self.next_index += stride
                    if isinstance(result, Record) and self.dedup is not None:
                        dup = self.dedup.check_and_add(result.id, result.instruction)
                        if dup is not None:
                            result = Rejection(
                                index=result.index,
                                reason="duplicate",
                                stage="response",
                                text=result.instruction,
                                detail=f"{dup.kind} duplicate of {dup.of_id} ({dup.similarity:.2f})",
                                record=result,
                            )
                    self.stats.attempts += 1
                    if isinstance(result, Record):
                        kept += 1
                        streak = 0
                    else:
                        self.stats.rejected[result.reason] += 1
                        streak += 1
                    yield result
                    if kept >= target:
                        return
                    if streak >= self.settings.max_reject_streak:
                        raise MagpieError(_streak_message(streak, self.stats))
                if deadline is not None and (not pending or loop.time() >= deadline):
                    return
        finally:
            for task in pending.values():
                task.cancel()
            if stop_wait is not None:
                stop_wait.cancel()
            await asyncio.gather(*pending.values(), return_exceptions=True)
