"""The Magpie pipeline: pre-query -> instruction -> clean -> response -> record.

:class:`Pipeline` turns attempt indexes into :class:`~magpie.records.Record` or
:class:`~magpie.records.Rejection` objects.  ``run()`` keeps up to
``concurrency`` attempts in flight and yields results in index order, so a run's
output depends only on its seed (and the model), never on timing: a resumed run
and an uninterrupted one write the same records.

With ``samples_per_request`` N > 1 (``--samples-per-request``, OpenAI-compatible
servers) the shard's k-th attempt belongs to group k // N: one raw request with
``n = N``, made with the seed, pre-query (system) and instruction sampling of the
group's first attempt index, gives the turn-1 instructions of all N attempts
(choice j to the group's j-th attempt); each attempt then goes on alone.  A run
that starts inside a group (a top-up) makes the group's request again and drops
the choices of the attempts before its start, so records stay reproducible per
index.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.base import Backend, Completion, Sampling
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import BackendError, MagpieError, UsageError
from magpie.pipeline.counters import RunStats
from magpie.pipeline.repetition import RepetitionGuard, looped
from magpie.pipeline.stages.balance import CategoryBalance
from magpie.pipeline.stages.clean import clean_instruction, cut_in_a_loop, template_reason
from magpie.pipeline.stages.dedup.index import DedupIndex, Duplicate
from magpie.pipeline.stages.guard import Guard
from magpie.pipeline.stages.judge import InstructionVerdict, Judge, JudgeInvalid, Thresholds
from magpie.pipeline.stages.reasoning import (
    ReasoningMode,
    instruction_reason,
    marker_in,
    split_reasoning,
    think_request,
)
from magpie.pipeline.steering import Draw, Steering
from magpie.records import (
    GuardVerdict,
    Message,
    Record,
    Rejection,
    StageInfo,
    derive_seed,
    record_id,
    utcnow,
)
from magpie.templates import PreQuery

#: Reject reasons of pairs whose request failed after its retries: failed_<cause>.
FAILED_PREFIX = "failed_"
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
    #: A pair whose request still fails after ``retry.max_retries`` is rejected
    #: as ``failed_<cause>``; this many such pairs in a row end the run (the
    #: server keeps failing: say so rather than burn the night).
    max_failure_streak: int = Field(5, ge=1)
    #: Keep responses cut by the token limit (finish reason "length") instead of
    #: rejecting them as ``response_truncated``.
    keep_truncated: bool = False
    #: ``--reasoning``: keep a reasoning model's thinking in the record, drop
    #: it, or ask the model not to think (magpie.pipeline.stages.reasoning).
    reasoning: ReasoningMode = "keep"
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
    #: ``--turns T``: conversations of T user turns (the model writes each
    #: follow-up question after its own answer).
    turns: int = Field(1, ge=1, le=8)
    #: ``--responses K``: sample K answers per instruction (a preference pair
    #: once judged: chosen = best, rejected = worst).
    responses: int = Field(1, ge=1, le=16)
    preference_temperature: float = Field(0.8, ge=0.0, le=5.0)
    #: (temperature, top_p) pairs for instructions, cycled by index (the
    #: reference's released sets varied them over runs, for diversity).
    schedule: list[tuple[float, float]] | None = None
    #: ``--samples-per-request N``: turn-1 instructions of N consecutive attempts
    #: (of this shard) from one request for ``n = N`` samples; needs a backend
    #: whose ``supports_complete_n()`` is True.  At most 32 (see RunConfig).
    samples_per_request: int = Field(1, ge=1, le=32)


@dataclass
class Instruction:
    index: int
    text: str
    completion: Completion
    seed: int
    verdict: InstructionVerdict | None = None
    sampling: Sampling | None = None
    #: Set when the text is choice ``choice`` of a request for ``n`` samples.
    n: int | None = None
    choice: int | None = None


@dataclass
class _Group:
    """The one ``n``-sample instruction request of a group of attempts."""

    task: asyncio.Future[list[Completion]]
    seed: int
    sampling: Sampling


def check_samples_per_request(backend: Backend, n: int) -> None:
    """Refuse ``n`` > 1 samples per request on a backend that cannot (exit 2)."""
    if n > 1 and not backend.supports_complete_n():
        raise UsageError(
            f"--samples-per-request {n}: the {backend.name} backend takes one sample per "
            "request; use 1, or --backend openai with a server that honours `n` (e.g. vLLM)"
        )


@dataclass
class SystemChoice:
    """One named system prompt of a weighted set, and its rendered pre-query."""

    name: str
    weight: float
    pre_query: PreQuery


def _stage(
    sampling: Sampling, seed: int, c: Completion, n: int | None = None, choice: int | None = None
) -> StageInfo:
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
        n=n,
        choice=choice,
    )


#: Reject reasons that point at a template that does not fit the model.
_TEMPLATE_REASONS = {"empty", "truncated", "special_token", "role_leak", "repetition"}


def _streak_message(streak: int, stats: RunStats, balance: CategoryBalance | None = None) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in stats.rejected.most_common())
    top = stats.rejected.most_common(1)[0][0] if stats.rejected else ""
    if top in _TEMPLATE_REASONS:
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
        systems: list[SystemChoice] | None = None,
        steering: Steering | None = None,
        balance: CategoryBalance | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.backend = backend
        #: ``--guard``: the safety classifier of every instruction and response.
        self.guard = guard
        self.pre_query = pre_query
        self.seed = seed
        self.settings = settings or PipelineSettings()
        check_samples_per_request(backend, self.settings.samples_per_request)
        self.stats = stats or RunStats()
        self.filters = list(filters or [])
        self.judge = judge
        self.systems = list(systems or [])
        #: Personas/topics drawn per record (bases rendered by the caller).
        self.steering = steering if steering is not None and steering.kinds else None
        #: --balance: caps on the judge's task categories (needs a judge).
        self.balance = balance
        if self.settings.turns > 1:
            for pq in [pre_query, *(c.pre_query for c in self.systems)]:
                pq.conversation(
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
                )
        #: Near-duplicate index: checked before a response is requested (against
        #: records already emitted) and updated in index order as records are
        #: emitted, so the decisions do not depend on timing.
        self.dedup = dedup
        #: Runs a plain (synchronous) embed function of ``dedup`` off the loop.
        self._embed_pool: ThreadPoolExecutor | None = None
        if judge is not None and judge.on_retry is None:
            judge.on_retry = self._on_retry
            judge.retry = self.settings.retry
        if guard is not None and guard.on_retry is None:
            guard.on_retry = self._on_retry
            guard.retry = self.settings.retry
        self._stop = list(dict.fromkeys([*pre_query.stop, *self.settings.extra_stop]))
        #: The first attempt index not yet yielded by ``run()``.
        self.next_index = 0
        #: ``samples_per_request`` > 1: the instruction request of each group in
        #: use, by the group's first attempt index (dropped once its last
        #: attempt took its sample, and when ``run()`` ends).
        self._groups: dict[int, _Group] = {}

    def _guard(self) -> RepetitionGuard | None:
        return RepetitionGuard() if self.settings.stop_repetition else None

    def _on_retry(self, cause: str) -> None:
        self.stats.retries[cause] += 1

    async def _call(self, fn: Callable[[], object]) -> Completion:
        return await call_with_retry(fn, self.settings.retry, self._on_retry)  # type: ignore[arg-type]

    def _group_of(self, index: int) -> tuple[int, int]:
        """The first attempt index of ``index``'s group and ``index``'s place in it
        (the shard's k-th attempt is the (k mod N)-th of group k // N)."""
        n = self.settings.samples_per_request
        if n == 1:
            return index, 0
        stride, offset = self.settings.shard_count, self.settings.shard_index
        place = ((index - offset) // stride) % n
        return index - place * stride, place

    def _pre_query_for(self, index: int) -> Draw:
        """The pre-query of an attempt: the run's, or one of a weighted set of
        system prompts, drawn reproducibly from the run seed and the index; with
        personas or topics, those drawn too and written into its system block."""
        pre_query, name = self.pre_query, None
        if self.systems:
            total = sum(c.weight for c in self.systems)
            h = hashlib.blake2b(f"{self.seed}:{index}:system".encode(), digest_size=8)
            point = int.from_bytes(h.digest(), "big") / 2**64 * total
            choice = self.systems[-1]
            for c in self.systems:
                point -= c.weight
                if point < 0:
                    choice = c
                    break
            pre_query, name = choice.pre_query, choice.name
        if self.steering is not None:
            return self.steering.draw(self.seed, index, name, name)
        return Draw(pre_query, name)

    def _instruction_sampling(self, index: int) -> Sampling:
        """The instruction sampling of an attempt (a schedule cycles by index)."""
        base = self.settings.instruction
        if not self.settings.schedule:
            return base
        temperature, top_p = self.settings.schedule[index % len(self.settings.schedule)]
        return base.model_copy(update={"temperature": temperature, "top_p": top_p})

    async def _complete(
        self, index: int, prompt: str, stage: str, pre_query: PreQuery
    ) -> tuple[str, str | None, Completion, int, Sampling]:
        # With several samples per request the schedule is chosen per group.
        sampling = self._instruction_sampling(self._group_of(index)[0])
        seed = derive_seed(self.seed, index, stage)
        completion = await self._call(
            lambda: self.backend.complete(
                prompt,
                sampling=sampling,
                stop=self._stops(pre_query),
                seed=seed,
                abort=self._guard(),
            )
        )
        self.stats.add_tokens(completion.prompt_tokens, completion.completion_tokens)
        text, reason = clean_instruction(completion, pre_query.forbidden)
        return text, reason, completion, seed, sampling

    def _group_request(self, start: int, pre_query: PreQuery) -> _Group:
        """The ``n``-sample request of the group that begins at ``start``
        (started by the group's first attempt to ask for it)."""
        group = self._groups.get(start)
        if group is None:
            n = self.settings.samples_per_request
            sampling = self._instruction_sampling(start)
            seed = derive_seed(self.seed, start, "instruction")
            stop = self._stops(pre_query)

            async def request() -> list[Completion]:
                choices: list[Completion] = await call_with_retry(
                    lambda: self.backend.complete_n(
                        pre_query.text, n, sampling=sampling, stop=stop, seed=seed
                    ),
                    self.settings.retry,
                    self._on_retry,
                )
                # The server prefilled the prompt once for all the samples.
                self.stats.add_tokens(
                    choices[0].prompt_tokens if choices else None,
                    sum(c.completion_tokens or 0 for c in choices),
                )
                return choices

            group = _Group(asyncio.ensure_future(request()), seed, sampling)
            self._groups[start] = group
        return group

    async def _sample(
        self, index: int, pre_query: PreQuery
    ) -> tuple[str, str | None, Completion, _Group, int] | Rejection:
        """Attempt ``index``'s instruction: its choice of its group's request."""
        n = self.settings.samples_per_request
        start, place = self._group_of(index)
        group = self._group_request(start, pre_query)
        try:
            # Shielded: one attempt cancelled must not cancel its group's request.
            choices = await asyncio.shield(group.task)
        except Exception:
            if self._groups.get(start) is group:
                del self._groups[start]  # a later attempt asks again
            raise
        if place == n - 1 and self._groups.get(start) is group:
            del self._groups[start]
        if place >= len(choices):
            return Rejection(
                index=index,
                reason="short_batch",
                detail=f"the server returned {len(choices)} of the {n} samples asked for "
                "(a server that ignores `n` needs --samples-per-request 1)",
            )
        completion = choices[place]
        text, reason = clean_instruction(completion, pre_query.forbidden)
        return text, reason, completion, group, place

    def _stops(self, pre_query: PreQuery) -> list[str]:
        if pre_query is self.pre_query:
            return self._stop
        return list(dict.fromkeys([*pre_query.stop, *self.settings.extra_stop]))

    async def instruction(
        self, index: int, pre_query: PreQuery | None = None
    ) -> Instruction | Rejection:
        """Stage 1-3: raw completion of the pre-query, cleaning, rule filters,
        dedup against records already written, and the optional pre-judge."""
        pre_query = pre_query or self.pre_query
        n: int | None = None
        choice: int | None = None
        if self.settings.samples_per_request > 1:
            sample = await self._sample(index, pre_query)
            if isinstance(sample, Rejection):
                return sample
            text, reason, completion, group, choice = sample
            seed, sampling, n = group.seed, group.sampling, self.settings.samples_per_request
        else:
            text, reason, completion, seed, sampling = await self._complete(
                index, pre_query.text, "instruction", pre_query
            )
        reason = reason or instruction_reason(completion, text)
        if reason is not None:  # not a usable instruction at all
            return Rejection(index=index, reason=reason, stage="instruction", text=text)
        for flt in self.filters:
            reason = reason or flt(text)
        if reason is None and self.dedup is not None:
            dup = await self._check_duplicate(text)
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
                self._count_saved()
                return Rejection(
                    index=index, reason="judge_invalid", stage="judge", text=text, detail=str(exc)
                )
            reason = self.settings.thresholds.instruction_reason(verdict)
            if reason is None and self.balance is not None:
                reason = self.balance.reserve(index, verdict.task_category)
        if reason is not None:
            self._count_saved()
            return Rejection(index=index, reason=reason, stage="instruction", text=text)
        return Instruction(
            index=index,
            text=text,
            completion=completion,
            seed=seed,
            verdict=verdict,
            sampling=sampling,
            n=n,
            choice=choice,
        )

    async def _check_duplicate(self, text: str) -> Duplicate | None:
        """Dedup of a new instruction against the records emitted so far.  With
        semantic dedup, an instruction that is no exact or near duplicate has
        its embedding awaited first (never computed on this event loop's
        thread) and handed to the index."""
        assert self.dedup is not None
        if self.dedup.embed is None:
            return self.dedup.check(text)
        dup = self.dedup.check(text, semantic=False)
        if dup is not None:
            return dup
        await self._ensure_embedding(text)
        return self.dedup.check(text)  # no await in between: the vector is still there

    async def _ensure_embedding(self, text: str) -> None:
        """Give the dedup index the embedding of ``text`` unless it has it:
        awaited through the embed function's ``aembed`` when it has one
        (:class:`magpie.pipeline.stages.dedup.embeddings.BackendEmbedder`), else the plain function
        runs on a worker thread of its own, one call at a time."""
        dedup = self.dedup
        if dedup is None or dedup.embed is None or dedup.has_embedding(text):
            return
        embed = dedup.embed
        aembed = getattr(embed, "aembed", None)
        if aembed is not None:
            vectors = await aembed([text])
        else:
            if self._embed_pool is None:
                self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="magpie-embed")
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._embed_pool, embed, [text])
        dedup.remember_embedding(text, vectors[0])

    def _count_saved(self) -> None:
        """An instruction rejected before its response: count the response
        tokens that were not spent (estimated by the mean so far)."""
        self.stats.saved_responses += 1

    async def _answer(
        self, messages: list[dict[str, str]], sampling: Sampling, seed: int, forbidden: list[str]
    ) -> tuple[Completion, str | None]:
        """One chat answer and its reject reason (None when it is usable): an
        answer is rendered back into the template (turn 2, the judge), so it
        gets the instruction's special-token and role-header rules.

        The answer's reasoning is split off (:func:`split_reasoning`): the
        completion returned has the answer alone as ``text`` and the reasoning
        as ``thinking`` (None with ``--reasoning drop|off``).  Reasoning is
        written into the record (and into a chat template when the data is
        trained on), so it gets the same token rules."""
        think = think_request(self.settings.reasoning)
        completion = await self._call(
            lambda: self.backend.chat(
                messages, sampling=sampling, seed=seed, abort=self._guard(), think=think
            )
        )
        self.stats.add_tokens(completion.prompt_tokens, completion.completion_tokens)
        self.stats.add_response(completion.completion_tokens)
        if cut_in_a_loop(completion) or looped(completion.text + (completion.thinking or "")):
            return completion, "response_repetition"
        answer, reasoning, unfinished = split_reasoning(completion)
        keep = self.settings.reasoning == "keep"
        completion = completion.model_copy(
            update={"text": answer, "thinking": reasoning if keep else None}
        )
        if not answer:
            if completion.finish_reason == "length" and not self.settings.keep_truncated:
                return completion, "response_truncated"
            return completion, "reasoning_only" if (reasoning or unfinished) else "empty_response"
        if completion.finish_reason == "length" and not self.settings.keep_truncated:
            return completion, "response_truncated"
        leak = template_reason(answer, forbidden)
        if leak is not None:
            return completion, f"response_{leak}"
        if marker_in(answer):
            return completion, "response_reasoning_leak"
        if keep and reasoning is not None:
            leak = template_reason(reasoning, forbidden)
            if leak is not None:
                return completion, f"reasoning_{leak}"
            if marker_in(reasoning):
                return completion, "reasoning_markup"
        return completion, None

    async def response(self, inst: Instruction, draw: Draw | None = None) -> Record | Rejection:
        """Stage 4-5: answer the instruction with the model's chat template (or
        sample ``responses`` answers for a preference pair)."""
        draw = draw or Draw(self.pre_query)
        pre_query = draw.pre_query
        sampling = self.settings.response
        messages = [{"role": "user", "content": inst.text}]
        k = self.settings.responses
        samples: list[str] = []
        if k == 1:
            seed = derive_seed(self.seed, inst.index, "response")
            completion, reason = await self._answer(messages, sampling, seed, pre_query.forbidden)
            if reason is not None:
                return Rejection(index=inst.index, reason=reason, stage="response", text=inst.text)
        else:
            sampling = sampling.model_copy(
                update={"temperature": self.settings.preference_temperature}
            )
            seeds = [derive_seed(self.seed, inst.index, f"sample:{j}") for j in range(k)]
            answers = await asyncio.gather(
                *(self._answer(messages, sampling, sd, pre_query.forbidden) for sd in seeds)
            )
            good = [(c, sd) for (c, r), sd in zip(answers, seeds, strict=True) if r is None]
            if len(good) < 2:
                return Rejection(
                    index=inst.index, reason="too_few_responses", stage="response", text=inst.text
                )
            completion, seed = good[0]
            samples = [c.text.strip() for c, _ in good]
        answer = completion.text.strip()
        reasoning = completion.thinking if k == 1 else None
        return Record(
            id=record_id(self.backend.model, pre_query.text, self.seed, inst.index),
            index=inst.index,
            instruction=inst.text,
            response=answer,
            messages=[
                Message(role="user", content=inst.text),
                Message(role="assistant", content=answer, reasoning_content=reasoning),
            ],
            model=self.backend.model,
            backend=self.backend.name,
            host=completion.host or self.backend.host,
            template=pre_query.name,
            template_source=pre_query.source,
            system=pre_query.system,
            system_name=draw.system_name,
            persona=draw.persona,
            topic=draw.topic,
            instruction_generation=_stage(
                inst.sampling or self.settings.instruction,
                inst.seed,
                inst.completion,
                inst.n,
                inst.choice,
            ),
            response_generation=_stage(sampling, seed, completion),
            seed=self.seed,
            created_at=utcnow(),
            responses=samples or None,
            reasoning=reasoning,
        )

    async def _more_turns(self, record: Record, pre_query: PreQuery) -> Record | Rejection:
        """Turns 2..T: the model writes the follow-up question after its own
        answer (the conversation rendered with its template, then the user
        header), then answers it with the whole conversation."""
        # What is sent back to the server: roles and texts, never the reasoning
        # (chat templates drop earlier turns' thinking); kept per turn beside it.
        messages = [{"role": m.role, "content": m.content} for m in record.messages]
        thoughts = [m.reasoning_content for m in record.messages]
        infos: list[dict[str, StageInfo]] = []
        for turn in range(2, self.settings.turns + 1):
            prompt = pre_query.conversation(messages)
            text, reason, completion, seed, sampling = await self._complete(
                record.index, prompt, f"instruction:{turn}", pre_query
            )
            reason = reason or instruction_reason(completion, text)
            if reason is not None:
                return Rejection(
                    index=record.index,
                    reason=f"turn{turn}_{reason}",
                    stage="instruction",
                    text=record.instruction,
                    record=record,
                )
            messages.append({"role": "user", "content": text})
            thoughts.append(None)
            rseed = derive_seed(self.seed, record.index, f"response:{turn}")
            answer, why = await self._answer(
                messages, self.settings.response, rseed, pre_query.forbidden
            )
            if why is not None:
                return Rejection(
                    index=record.index,
                    reason=f"turn{turn}_{why}",
                    stage="response",
                    text=record.instruction,
                    record=record,
                )
            messages.append({"role": "assistant", "content": answer.text.strip()})
            thoughts.append(answer.thinking)
            infos.append(
                {
                    "instruction": _stage(sampling, seed, completion),
                    "response": _stage(self.settings.response, rseed, answer),
                }
            )
        return record.model_copy(
            update={
                "messages": [
                    Message(**m, reasoning_content=t)
                    for m, t in zip(messages, thoughts, strict=True)
                ],
                "turns": self.settings.turns,
                "turn_generations": infos,
            }
        )

    async def _judge_samples(self, record: Record) -> Record | Rejection:
        """Score each sampled answer; chosen = best, rejected = worst."""
        assert self.judge is not None and record.responses
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
        thresholds = self.settings.thresholds
        reason = thresholds.instruction_reason(tags) or thresholds.response_reason(tags)
        return record if reason is None else _judge_reject(record, reason)

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
            return _judge_reject(record, "judge_invalid", f"{exc} (reply: {exc.reply[:200]!r})")
        record.judge = tags
        reason = None if inst.verdict is not None else thresholds.instruction_reason(tags)
        reason = reason or thresholds.response_reason(tags)
        return record if reason is None else _judge_reject(record, reason)

    async def _attempt_or_failure(self, index: int) -> Record | Rejection:
        """:meth:`attempt`, with a request that failed after all its retries
        turned into a rejection (``failed_<cause>``, the error as its detail):
        one pair's bad luck does not end a nightly run (``run()`` stops when
        ``max_failure_streak`` pairs in a row fail)."""
        try:
            return await self.attempt(index)
        except BackendError as exc:
            return Rejection(
                index=index, reason=f"{FAILED_PREFIX}{exc.cause}", stage="request", detail=str(exc)
            )

    async def attempt(self, index: int) -> Record | Rejection:
        """One full attempt: instruction, then (if kept) its response."""
        # With several samples per request the system is chosen per group.
        draw = self._pre_query_for(self._group_of(index)[0])
        pre_query = draw.pre_query
        inst = await self.instruction(index, pre_query)
        if isinstance(inst, Rejection):
            return inst
        verdict: GuardVerdict | None = None
        if self.guard is not None:
            early = await self.guard.check_instruction(
                inst.index, inst.text, self.settings.thresholds.drop_unsafe
            )
            if isinstance(early, Rejection):
                self._count_saved()
                return early
            verdict = early
        result = await self.response(inst, draw)
        if isinstance(result, Record) and self.settings.turns > 1:
            result = await self._more_turns(result, pre_query)
        if self.guard is not None and verdict is not None and isinstance(result, Record):
            result = await self.guard.check_record(
                result, verdict, self.settings.thresholds.drop_unsafe
            )
            if isinstance(result, Rejection):
                return result
        if self.judge is not None and isinstance(result, Record):
            if result.responses:
                return await self._judge_samples(result)
            return await self._judge(result, inst)
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
                    if self.balance is not None:
                        result = self.balance.settle(result)
                    if isinstance(result, Record) and self.dedup is not None:
                        text = result.instruction
                        if (
                            not self.dedup.has_embedding(text)
                            and self.dedup.check(text, semantic=False) is None
                        ):
                            await self._ensure_embedding(text)  # it left the index's cache
                        dup = self.dedup.check_and_add(result.id, text)
                        if dup is not None:
                            result = Rejection(
                                index=result.index,
                                reason="duplicate",
                                stage="response",
                                text=result.instruction,
                                detail=f"{dup.kind} duplicate of {dup.of_id} ({dup.similarity:.2f})",
                                record=result,
                            )
                            if self.balance is not None:
                                self.balance.unsettle(result.record)  # type: ignore[arg-type]
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
                        raise MagpieError(_streak_message(streak, self.stats, self.balance))
                if deadline is not None and (not pending or loop.time() >= deadline):
                    return
        finally:
            for task in pending.values():
                task.cancel()
            if stop_wait is not None:
                stop_wait.cancel()
            groups = [g.task for g in self._groups.values()]
            self._groups.clear()
            for group_task in groups:
                group_task.cancel()
            await asyncio.gather(*pending.values(), *groups, return_exceptions=True)
            if self._embed_pool is not None:
                self._embed_pool.shutdown(wait=False)
                self._embed_pool = None
