"""Retrying failed backend requests: one policy for every backend."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.errors import BackendError, BackendUnavailable

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """Exponential backoff with full jitter.

    ``max_retries`` bounds retries of failed requests (5xx, 429, timeouts, resets,
    mid-stream errors, empty raw replies).  A backend that is unreachable
    (connection refused) is retried for up to ``unreachable_budget`` seconds
    instead: a restarting server is waited for, a dead one ends the run.
    """

    model_config = ConfigDict(extra="forbid")

    max_retries: int = Field(5, ge=0)
    backoff_base: float = Field(0.5, ge=0.0)
    backoff_max: float = Field(20.0, ge=0.0)
    unreachable_budget: float = Field(120.0, ge=0.0)

    def delay(self, attempt: int) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2 ** max(0, attempt - 1)))
        return random.uniform(cap / 2, cap) if cap > 0 else 0.0


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, retrying what is worth retrying.

    Failed requests and an unreachable server are counted apart: the time a
    server is down is bounded by ``unreachable_budget``, and those retries do
    not use up ``max_retries``, so the first ordinary error after a restart is
    retried like any other.  Each kind backs off from its own first step.
    """
    failures = 0  # failed requests: bounded by max_retries
    outage = 0  # retries while unreachable: bounded by unreachable_budget
    down_since: float | None = None
    while True:
        try:
            return await fn()
        except BackendUnavailable:
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if now - down_since >= policy.unreachable_budget:
                raise
            outage += 1
            cause, step = "unreachable", outage
        except BackendError as exc:
            if not exc.retryable or failures >= policy.max_retries:
                raise
            failures += 1
            cause, step = exc.cause, failures
            down_since, outage = None, 0
        if on_retry is not None:
            on_retry(cause)
        await asyncio.sleep(policy.delay(step))


class StartRetry(Backend):
    """A backend whose start-up requests go through the retry policy.

    What a run (or ``magpie doctor``) asks before its first pair is
    ``describe`` (Ollama's show and tags, an OpenAI-compatible server's
    models), ``render_chat`` (the pre-query render, Ollama's version check),
    ``probe`` and ``check_model``: a 503 there (Ollama's answer when its queue
    is full) or a timeout is retried like any request, and a refused
    connection is not retried when the policy's ``unreachable_budget`` is 0
    (the server is down: exit 3 at once).  The generation requests
    (``complete``, ``complete_n``, ``chat``, ``embed``) pass through
    untouched: the pipeline retries each of them per pair and counts it.
    :func:`magpie.backends.registry.choose_backend` wraps every backend it
    opens, so no caller retries a start-up request of its own.
    """

    def __init__(
        self,
        backend: Backend,
        policy: RetryPolicy,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = backend
        self.policy = policy
        self.on_retry = on_retry
        self.name = backend.name
        self.render_source = backend.render_source
        self.auto_concurrency = backend.auto_concurrency

    def __getattr__(self, name: str) -> object:
        # What a backend has beyond the contract (an engine's own methods).
        return getattr(self.inner, name)

    async def _retried(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retry(fn, self.policy, self.on_retry)

    # The start-up requests: retried.
    async def describe(self) -> ModelInfo:
        return await self._retried(self.inner.describe)

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        return await self._retried(lambda: self.inner.render_chat(messages))

    async def probe(self) -> str:
        return await self._retried(self.inner.probe)

    async def check_model(self) -> tuple[ModelInfo, str]:
        return await self._retried(self.inner.check_model)

    # Everything else: as the backend does it.
    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def host(self) -> str | None:
        return self.inner.host

    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        return await self.inner.complete(
            prompt, sampling=sampling, stop=stop, seed=seed, abort=abort
        )

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        sampling: Sampling,
        seed: int | None = None,
        abort: AbortCheck | None = None,
        json_schema: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> Completion:
        return await self.inner.chat(
            messages,
            sampling=sampling,
            seed=seed,
            abort=abort,
            json_schema=json_schema,
            think=think,
        )

    def supports_complete_n(self) -> bool:
        return self.inner.supports_complete_n()

    async def complete_n(
        self,
        prompt: str,
        n: int,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
    ) -> list[Completion]:
        return await self.inner.complete_n(prompt, n, sampling=sampling, stop=stop, seed=seed)

    def supports_embed(self) -> bool:
        return self.inner.supports_embed()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        await self.inner.aclose()


def with_start_retry(
    backend: Backend, policy: RetryPolicy | None, on_retry: Callable[[str], None] | None = None
) -> Backend:
    """``backend`` with its start-up requests retried (:class:`StartRetry`);
    as it is without a policy."""
    if policy is None or isinstance(backend, StartRetry):
        return backend
    return StartRetry(backend, policy, on_retry)
