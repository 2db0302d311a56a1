"""The Magpie pipeline: pre-query -> instruction -> stages -> response -> stages
-> record, scheduled in order.

:class:`Pipeline` turns attempt indexes into :class:`~magpie.records.Record` or
:class:`~magpie.records.Rejection` objects.  ``run()`` keeps up to
``concurrency`` attempts in flight and yields results in index order, so a run's
output depends only on its seed (and the model), never on timing: a resumed run
and an uninterrupted one write the same records.

An attempt is the model calls of :class:`~magpie.pipeline.attempt.Generator`
with an ordered list of stages (:class:`~magpie.pipeline.stages.base.Stage`)
between them: ``on_instruction`` in list order once a user turn is generated
(the instruction, and with ``--turns`` each follow-up question), ``on_answer``
in reverse order once its answer is, ``on_pair`` in reverse order once the
conversation is complete, ``on_emit`` in reverse order as results are emitted
in index order.  A rejection of turn N > 1 is ``turnN_<reason>``.  The list, by
default: clean, reasoning, filters, dedup, judge, balance, guard, then the
caller's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from magpie.backends.base import Backend
from magpie.errors import BackendError, ContextOverflow, MagpieError
from magpie.pipeline.attempt import (
    Generator,
    SystemChoice,
    check_samples_per_request,
    with_question,
)
from magpie.pipeline.config import (
    PipelineSettings,
    default_instruction_sampling,
    default_response_sampling,
)
from magpie.pipeline.counters import RunStats
from magpie.pipeline.stages.balance import CategoryBalance
from magpie.pipeline.stages.base import Instruction, Stage
from magpie.pipeline.stages.clean import Clean
from magpie.pipeline.stages.dedup.index import DedupIndex
from magpie.pipeline.stages.dedup.stage import Dedup
from magpie.pipeline.stages.filters import Filters, InstructionFilter
from magpie.pipeline.stages.guard import Guard, GuardStage
from magpie.pipeline.stages.judge import Judge, JudgeStage
from magpie.pipeline.stages.reasoning import NoReasoning
from magpie.pipeline.steering import Draw, Steering
from magpie.records import Record, Rejection
from magpie.templates import PreQuery

__all__ = [
    "CONTEXT_OVERFLOW",
    "FAILED_PREFIX",
    "Instruction",
    "InstructionFilter",
    "Pipeline",
    "PipelineSettings",
    "SystemChoice",
    "check_samples_per_request",
    "default_instruction_sampling",
    "default_response_sampling",
]

#: Reject reasons of pairs whose request failed after its retries: failed_<cause>.
FAILED_PREFIX = "failed_"
#: The reject reason of a pair one of whose prompts did not fit the model's
#: context (:class:`~magpie.errors.ContextOverflow`: refused by the server,
#: never cut); its detail has the token counts.
CONTEXT_OVERFLOW = "context_overflow"

#: Reject reasons that point at a template that does not fit the model.
_TEMPLATE_REASONS = {"empty", "truncated", "special_token", "role_leak", "repetition"}


def _streak_message(
    streak: int,
    stats: RunStats,
    balance: CategoryBalance | None = None,
    overflow: ContextOverflow | None = None,
) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in stats.rejected.most_common())
    top = stats.rejected.most_common(1)[0][0] if stats.rejected else ""
    if top == CONTEXT_OVERFLOW:
        counts = f" (last: {overflow.message})" if overflow is not None else ""
        fix = overflow.fix if overflow is not None and overflow.fix else "raise it (--num-ctx)"
        hint = f"the prompts do not fit the model's context{counts}; {fix}"
    elif top in _TEMPLATE_REASONS:
        hint = (
            "the template probably does not fit this model; check --template and --system "
            "(`magpie templates list`)"
        )
    elif top == "judge_invalid":
        hint = "the judge model does not answer with valid JSON; try a larger --judge model"
    elif top == "over_quota":
        hint = (
            "the category caps of --balance are full for the categories this model writes; "
            "name those with --categories, or raise balance_tolerance"
            + (f" ({balance.describe()})" if balance is not None else "")
        )
    elif top == "short_batch":
        hint = "the server returns fewer samples than asked for; use --samples-per-request 1"
    else:
        hint = "the filters or judge thresholds reject everything; loosen them"
    return f"the last {streak} attempts were all rejected ({reasons}): {hint}"


def _turn_rejection(turn: int, rejection: Rejection, record: Record | None) -> Rejection:
    """A rejection of turn ``turn`` > 1: ``turnN_<reason>``, with the
    conversation up to what was rejected (the stage's record, or ``record``)."""
    return rejection.model_copy(
        update={"reason": f"turn{turn}_{rejection.reason}", "record": rejection.record or record}
    )


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
        answer_filters: list[InstructionFilter] | None = None,
        judge: Judge | None = None,
        dedup: DedupIndex | None = None,
        systems: list[SystemChoice] | None = None,
        steering: Steering | None = None,
        balance: CategoryBalance | None = None,
        guard: Guard | None = None,
        stages: list[Stage] | None = None,
    ) -> None:
        settings = settings or PipelineSettings()
        check_samples_per_request(backend, settings.samples_per_request)
        stats = stats or RunStats()
        systems = list(systems or [])
        if settings.turns > 1:
            for pq in [pre_query, *(c.pre_query for c in systems)]:
                pq.conversation(
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
                )
        #: The model calls of each attempt.
        self.generator = Generator(
            backend,
            pre_query,
            seed=seed,
            settings=settings,
            stats=stats,
            systems=systems,
            # Personas/topics drawn per record (bases rendered by the caller).
            steering=steering if steering is not None and steering.kinds else None,
        )
        #: The rule filters of every user turn, and those of every answer
        #: (:func:`~magpie.pipeline.stages.filters.build_answer_filters`).
        self.filters = list(filters or [])
        self.answer_filters = list(answer_filters or [])
        self.judge = judge
        #: Near-duplicate index: checked before a response is requested (against
        #: records already emitted) and updated in index order as records are
        #: emitted, so the decisions do not depend on timing.
        self.dedup = dedup
        #: --balance: caps on the judge's task categories (needs a judge).
        self.balance = balance
        #: ``--guard``: the safety classifier of every instruction and response.
        self.guard = guard
        on_retry = self.generator.on_retry
        for client in (judge, guard):
            if client is not None and client.on_retry is None:
                client.on_retry = on_retry
                client.retry = settings.retry
        thresholds = settings.thresholds
        built: list[Stage | None] = [
            Clean(),
            NoReasoning(),
            Filters(self.filters, self.answer_filters)
            if self.filters or self.answer_filters
            else None,
            Dedup(dedup) if dedup is not None else None,
            JudgeStage(judge, thresholds, prejudge=settings.prejudge)
            if judge is not None
            else None,
            balance,
            GuardStage(guard, thresholds.drop_unsafe) if guard is not None else None,
            *(stages or []),
        ]
        #: The stages in order (``on_instruction`` runs down the list,
        #: ``on_pair`` and ``on_emit`` up it).
        self.stages: list[Stage] = [s for s in built if s is not None]
        #: The first attempt index not yet yielded by ``run()``.
        self.next_index = 0
        #: The last prompt that did not fit the context (its counts, and how to
        #: raise the context on this backend), for the messages that say so.
        self.overflow: ContextOverflow | None = None

    # The generator's own, read through the pipeline.
    @property
    def backend(self) -> Backend:
        return self.generator.backend

    @property
    def pre_query(self) -> PreQuery:
        return self.generator.pre_query

    @property
    def seed(self) -> int:
        return self.generator.seed

    @property
    def settings(self) -> PipelineSettings:
        return self.generator.settings

    @property
    def stats(self) -> RunStats:
        return self.generator.stats

    @property
    def systems(self) -> list[SystemChoice]:
        return self.generator.systems

    @property
    def steering(self) -> Steering | None:
        return self.generator.steering

    async def instruction(
        self, index: int, pre_query: PreQuery | None = None
    ) -> Instruction | Rejection:
        """The instruction of attempt ``index`` and its ``on_instruction`` stages
        (cleaning, rule filters, dedup against records already written, the
        optional pre-judge, the guard), before any response is requested."""
        candidate = await self.generator.instruction(index, pre_query or self.pre_query)
        if isinstance(candidate, Rejection):
            return candidate
        return await self._check_user_turn(candidate)

    async def _check_user_turn(self, candidate: Instruction) -> Instruction | Rejection:
        """The ``on_instruction`` stages of a user turn, in list order."""
        for stage in self.stages:
            result = await stage.on_instruction(candidate)
            if isinstance(result, Rejection):
                if stage.saves_response:
                    # The response tokens not spent (estimated by the mean so far).
                    self.stats.saved_responses += 1
                return result
            candidate = result
        return candidate

    async def _check_answer(self, candidate: Instruction, record: Record) -> Record | Rejection:
        """The ``on_answer`` stages of a turn's answer, in reverse order."""
        result: Record | Rejection = record
        for stage in reversed(self.stages):
            if not isinstance(result, Record):
                break
            result = await stage.on_answer(candidate, result)
        return result

    async def response(self, inst: Instruction, draw: Draw | None = None) -> Record | Rejection:
        """Answer the instruction (no stages): a record, or its rejection."""
        return await self.generator.response(inst, draw)

    async def attempt(self, index: int) -> Record | Rejection:
        """One full attempt: instruction, then (if kept) its response, and with
        ``--turns T`` each later turn (its question, then its answer), every
        user turn and every answer through the stages; then the ``on_pair``
        stages on the whole conversation."""
        draw = self.generator.draw(index)
        inst = await self.instruction(index, draw.pre_query)
        if isinstance(inst, Rejection):
            return inst
        result = await self.generator.response(inst, draw)
        if isinstance(result, Record):
            result = await self._check_answer(inst, result)
        for _ in range(1, self.settings.turns):
            if not isinstance(result, Record):
                return result
            result = await self._later_turn(result, draw.pre_query)
        for stage in reversed(self.stages):
            if not isinstance(result, Record):
                break
            result = await stage.on_pair(inst, result)
        return result

    async def _later_turn(self, record: Record, pre_query: PreQuery) -> Record | Rejection:
        """Turn ``record.turns + 1``: its question through the ``on_instruction``
        stages, its answer through the ``on_answer`` stages.  A rejection is
        ``turnN_<reason>`` and carries the conversation up to what was
        rejected (the question, or the question and its answer)."""
        question = await self.generator.follow_up(record, pre_query)
        checked = await self._check_user_turn(question)
        if isinstance(checked, Rejection):
            asked = with_question(record, question, self.settings.instruction)
            asked.messages[-1].content = checked.text or question.text
            return _turn_rejection(question.turn, checked, asked)
        longer = await self.generator.answer_turn(record, checked, pre_query)
        if isinstance(longer, Record):
            longer = await self._check_answer(checked, longer)
        if isinstance(longer, Rejection):
            return _turn_rejection(question.turn, longer, None)
        return longer

    async def _attempt_or_failure(self, index: int) -> Record | Rejection:
        """:meth:`attempt`, with a request that failed after all its retries
        turned into a rejection (``failed_<cause>``, the error as its detail):
        one pair's bad luck does not end a nightly run (``run()`` stops when
        ``max_failure_streak`` pairs in a row fail).  A prompt that did not fit
        the context is the rejection ``context_overflow`` (never retried, not a
        failure: its detail has the counts and how to raise the context)."""
        try:
            return await self.attempt(index)
        except ContextOverflow as exc:
            # Not a failure (retrying overflows again) and not a cut record:
            # the pair is rejected, the run goes on.
            self.overflow = exc
            return Rejection(index=index, reason=CONTEXT_OVERFLOW, stage="request", detail=str(exc))
        except BackendError as exc:
            return Rejection(
                index=index, reason=f"{FAILED_PREFIX}{exc.cause}", stage="request", detail=str(exc)
            )

    async def _emit(self, result: Record | Rejection) -> Record | Rejection:
        """The ``on_emit`` stages of a result, in index order; a record one of
        them rejects is revoked from those that let it through."""
        passed: list[Stage] = []
        for stage in reversed(self.stages):
            out = await stage.on_emit(result)
            if isinstance(result, Record):
                if isinstance(out, Rejection):
                    for earlier in reversed(passed):
                        earlier.revoke(result)
                else:
                    passed.append(stage)
            result = out
        return result

    def _keep_rate(self, kept: int) -> float:
        """Share of attempts that became records so far, at least 0.1: 1 until
        an attempt is rejected (a run that keeps everything makes exactly N
        attempts)."""
        return max(0.1, (kept + 1) / (self.stats.attempts + 1))

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

        With ``samples_per_request`` N > 1 ``concurrency`` still counts attempts
        (pairs) in flight: a group's request is made when the first of its
        attempts starts, its other attempts take their samples as they start
        (at once when the request is done); attempts not started when the run
        stops are dropped, and a resumed run makes their group's request again.
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
        kept = streak = failed = 0
        deadline: float | None = None  # set once stopping: the end of the grace period
        stop_wait = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while kept < target:
                if stop is not None and stop.is_set() and deadline is None:
                    if grace <= 0 or not pending:
                        return
                    deadline = loop.time() + grace
                if deadline is None:
                    # Near the end, start as many attempts as are expected to
                    # be needed (each keeps a pair at the run's keep rate so
                    # far), so that the slots stay busy while some fail: the
                    # output is the same (first N by index), surplus attempts
                    # are cancelled when N is reached.
                    rate = self._keep_rate(kept)
                    potential = (
                        kept
                        + len(pending) * rate
                        + sum(isinstance(r, Record) for r in done.values())
                    )
                    while (
                        len(pending) < k
                        and potential < target
                        and (next_index - self.next_index) // stride < window
                    ):
                        pending[next_index] = asyncio.ensure_future(
                            self._attempt_or_failure(next_index)
                        )
                        next_index += stride
                        potential += rate
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
                    result = await self._emit(result)
                    self.stats.attempts += 1
                    if isinstance(result, Record):
                        kept += 1
                        streak = failed = 0
                    else:
                        self.stats.rejected[result.reason] += 1
                        streak += 1
                        failed = failed + 1 if result.reason.startswith(FAILED_PREFIX) else 0
                    yield result
                    if kept >= target:
                        return
                    if failed >= self.settings.max_failure_streak:
                        raise MagpieError(
                            f"the last {failed} pairs all failed after their retries "
                            f"(last: {result.detail}); the records so far are kept and a "
                            "rerun continues from here"
                        )
                    if streak >= self.settings.max_reject_streak:
                        raise MagpieError(
                            _streak_message(streak, self.stats, self.balance, self.overflow)
                        )
                if deadline is not None and (not pending or loop.time() >= deadline):
                    return
        finally:
            for task in pending.values():
                task.cancel()
            if stop_wait is not None:
                stop_wait.cancel()
            groups = self.generator.close()
            for group_task in groups:
                group_task.cancel()
            await asyncio.gather(*pending.values(), *groups, return_exceptions=True)
            for stage in self.stages:
                stage.close()
