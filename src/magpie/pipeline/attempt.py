"""The model calls of one attempt: its pre-query, its instruction, its answer(s)
and its follow-up turns (the stages in between are the scheduler's).

Everything is drawn from the run seed and the attempt index (the system prompt,
personas/topics, the sampling of a schedule, every request's seed), so an
attempt gives the same record whenever it runs.

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
from collections.abc import Callable
from dataclasses import dataclass

from magpie.backends.base import Backend, Completion, Sampling
from magpie.backends.retry import call_with_retry
from magpie.errors import UsageError
from magpie.pipeline.config import PipelineSettings
from magpie.pipeline.counters import RunStats
from magpie.pipeline.repetition import RepetitionGuard
from magpie.pipeline.stages.base import Instruction
from magpie.pipeline.stages.clean import clean_response
from magpie.pipeline.stages.reasoning import think_request
from magpie.pipeline.steering import Draw, Steering
from magpie.records import Message, Record, Rejection, StageInfo, derive_seed, record_id, utcnow
from magpie.templates import PreQuery


@dataclass
class SystemChoice:
    """One named system prompt of a weighted set, and its rendered pre-query."""

    name: str
    weight: float
    pre_query: PreQuery


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


def stage_info(
    sampling: Sampling, seed: int, c: Completion, n: int | None = None, choice: int | None = None
) -> StageInfo:
    return StageInfo(
        **sampling.model_dump(),  # every sampling setting (StageInfo forbids others)
        seed=seed,
        finish_reason=c.finish_reason,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        n=n,
        choice=choice,
    )


class Generator:
    """Makes the model calls of attempts from one backend and pre-query."""

    def __init__(
        self,
        backend: Backend,
        pre_query: PreQuery,
        *,
        seed: int,
        settings: PipelineSettings,
        stats: RunStats,
        systems: list[SystemChoice],
        steering: Steering | None,
    ) -> None:
        self.backend = backend
        self.pre_query = pre_query
        self.seed = seed
        self.settings = settings
        self.stats = stats
        self.systems = systems
        self.steering = steering
        self._stop = list(dict.fromkeys([*pre_query.stop, *settings.extra_stop]))
        #: ``samples_per_request`` > 1: the instruction request of each group in
        #: use, by the group's first attempt index (dropped once its last
        #: attempt took its sample, and by :meth:`close`).
        self._groups: dict[int, _Group] = {}

    def _guard(self) -> RepetitionGuard | None:
        return RepetitionGuard() if self.settings.stop_repetition else None

    def on_retry(self, cause: str) -> None:
        self.stats.retries[cause] += 1

    async def _call(self, fn: Callable[[], object]) -> Completion:
        return await call_with_retry(fn, self.settings.retry, self.on_retry)  # type: ignore[arg-type]

    def group_of(self, index: int) -> tuple[int, int]:
        """The first attempt index of ``index``'s group and ``index``'s place in it
        (the shard's k-th attempt is the (k mod N)-th of group k // N)."""
        n = self.settings.samples_per_request
        if n == 1:
            return index, 0
        stride, offset = self.settings.shard_count, self.settings.shard_index
        place = ((index - offset) // stride) % n
        return index - place * stride, place

    def draw(self, index: int) -> Draw:
        """The pre-query of an attempt: the run's, or one of a weighted set of
        system prompts, drawn reproducibly from the run seed and the index; with
        personas or topics, those drawn too and written into its system block.
        With several samples per request it is drawn per group."""
        index = self.group_of(index)[0]
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

    def _stops(self, pre_query: PreQuery) -> list[str]:
        if pre_query is self.pre_query:
            return self._stop
        return list(dict.fromkeys([*pre_query.stop, *self.settings.extra_stop]))

    async def _complete(
        self, index: int, prompt: str, stage: str, pre_query: PreQuery
    ) -> tuple[Completion, int, Sampling]:
        # With several samples per request the schedule is chosen per group.
        sampling = self._instruction_sampling(self.group_of(index)[0])
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
        return completion, seed, sampling

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
                    self.on_retry,
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

    async def _sample(self, index: int, pre_query: PreQuery) -> Instruction | Rejection:
        """Attempt ``index``'s instruction: its choice of its group's request."""
        n = self.settings.samples_per_request
        start, place = self.group_of(index)
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
        return Instruction(
            index=index,
            text=completion.text,
            completion=completion,
            seed=group.seed,
            sampling=group.sampling,
            n=n,
            choice=place,
            forbidden=pre_query.forbidden,
        )

    async def instruction(self, index: int, pre_query: PreQuery) -> Instruction | Rejection:
        """The raw completion of the pre-query (or this attempt's choice of its
        group's request): the candidate the stages then check."""
        if self.settings.samples_per_request > 1:
            return await self._sample(index, pre_query)
        completion, seed, sampling = await self._complete(
            index, pre_query.text, "instruction", pre_query
        )
        return Instruction(
            index=index,
            text=completion.text,
            completion=completion,
            seed=seed,
            sampling=sampling,
            forbidden=pre_query.forbidden,
        )

    async def _answer(
        self, messages: list[dict[str, str]], sampling: Sampling, seed: int, forbidden: list[str]
    ) -> tuple[Completion, str | None]:
        """One chat answer and its reject reason (None when it is usable), by
        :func:`~magpie.pipeline.stages.clean.clean_response`."""
        think = think_request(self.settings.reasoning)
        completion = await self._call(
            lambda: self.backend.chat(
                messages, sampling=sampling, seed=seed, abort=self._guard(), think=think
            )
        )
        self.stats.add_tokens(completion.prompt_tokens, completion.completion_tokens)
        self.stats.add_response(completion.completion_tokens)
        return clean_response(
            completion,
            forbidden,
            keep_reasoning=self.settings.reasoning == "keep",
            keep_truncated=self.settings.keep_truncated,
        )

    async def response(self, inst: Instruction, draw: Draw | None = None) -> Record | Rejection:
        """Answer the instruction with the model's chat template (or sample
        ``responses`` answers for a preference pair)."""
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
            id=record_id(self.backend.model, pre_query.undated, self.seed, inst.index),
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
            instruction_generation=stage_info(
                inst.sampling or self.settings.instruction,
                inst.seed,
                inst.completion,
                inst.n,
                inst.choice,
            ),
            response_generation=stage_info(sampling, seed, completion),
            seed=self.seed,
            created_at=utcnow(),
            responses=samples or None,
            reasoning=reasoning,
        )

    async def follow_up(self, record: Record, pre_query: PreQuery) -> Instruction:
        """The next user turn of ``record`` (turn ``record.turns + 1``): the model
        writes the follow-up question after its own answer (the conversation
        rendered with its template, then the user header).  The raw completion:
        the candidate the stages then check, as turn 1's instruction."""
        turn = record.turns + 1
        completion, seed, sampling = await self._complete(
            record.index,
            pre_query.conversation(_sent(record.messages)),
            f"instruction:{turn}",
            pre_query,
        )
        return Instruction(
            index=record.index,
            text=completion.text,
            completion=completion,
            seed=seed,
            sampling=sampling,
            forbidden=pre_query.forbidden,
            turn=turn,
            history=list(record.messages),
        )

    async def answer_turn(
        self, record: Record, question: Instruction, pre_query: PreQuery
    ) -> Record | Rejection:
        """Answer the follow-up ``question`` (checked by the stages) with the
        whole conversation: the record one turn longer, or the rejection of the
        answer (:func:`~magpie.pipeline.stages.clean.clean_response`), which
        carries the conversation with the rejected answer."""
        messages = [*_sent(record.messages), {"role": "user", "content": question.text}]
        seed = derive_seed(self.seed, record.index, f"response:{question.turn}")
        answer, why = await self._answer(
            messages, self.settings.response, seed, pre_query.forbidden
        )
        longer = with_question(record, question, self.settings.instruction)
        assert longer.turn_generations is not None
        longer.turn_generations[-1]["response"] = stage_info(self.settings.response, seed, answer)
        longer.messages.append(
            Message(
                role="assistant", content=answer.text.strip(), reasoning_content=answer.thinking
            )
        )
        if why is not None:
            return Rejection(
                index=record.index, reason=why, stage="response", text=question.text, record=longer
            )
        return longer

    def close(self) -> list[asyncio.Future[list[Completion]]]:
        """Forget the groups' requests in flight; they are returned to be cancelled."""
        groups = [g.task for g in self._groups.values()]
        self._groups.clear()
        return groups


def _sent(messages: list[Message]) -> list[dict[str, str]]:
    """What is sent back to the server: roles and texts, never the reasoning
    (chat templates drop earlier turns' thinking; the record keeps it per turn)."""
    return [{"role": m.role, "content": m.content} for m in messages]


def with_question(record: Record, question: Instruction, default: Sampling) -> Record:
    """``record`` with the user turn ``question`` added (``turns`` counts it,
    ``turn_generations`` gets its instruction's info): the record a later turn
    grows from, and what the rejection of that user turn carries."""
    info = stage_info(question.sampling or default, question.seed, question.completion)
    return record.model_copy(
        update={
            "messages": [*record.messages, Message(role="user", content=question.text)],
            "turns": question.turn,
            "turn_generations": [*(record.turn_generations or []), {"instruction": info}],
        }
    )
