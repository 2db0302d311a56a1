"""The library-level settings of the generation pipeline (:class:`PipelineSettings`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.base import Sampling
from magpie.backends.retry import RetryPolicy
from magpie.pipeline.stages.judge import Thresholds
from magpie.pipeline.stages.reasoning import ReasoningMode


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
