"""Retrying failed backend requests: one policy for every backend.

:func:`call_with_retry` is the one loop, used at two depths:

* each start-up request of a backend (what ``describe``, ``render_chat``,
  ``probe`` and ``check_model`` ask: Ollama's show, tags, version and render,
  an OpenAI-compatible server's models, ``/props``, ``/tokenize`` and
  ``/apply-template``) is retried by itself, where the backend sends it
  (:meth:`magpie.backends.base.Backend._start_request`), with the policy that
  :func:`magpie.backends.registry.choose_backend` gives every backend it opens
  (:meth:`~magpie.backends.base.Backend.retry_start_requests`): a 503 (Ollama's
  answer when its queue is full, llama-server's while it loads the model) is
  asked again, never taken for a missing endpoint, and never ends a run;
* a generation request (``complete``, ``chat``, ``embed``) is retried by the
  pipeline, the judge, the guard or the embedder per pair, which counts it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

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
