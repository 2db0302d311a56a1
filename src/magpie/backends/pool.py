"""Many hosts behind one backend: ``--host A --host B ...``.

Requests go to the healthy host with the fewest requests in flight, each host
holding at most ``per_host`` at once.  A host that fails (unreachable, 5xx,
timeout) is taken out for a cooldown that grows while it keeps failing, and the
request goes to another host at once; when every host has failed it, the error
goes up to the retry policy, which backs off and tries again.  A host that
comes back is used again after its cooldown.  Pairs (answered chats) are
counted per host for the summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.backends.retry import RetryPolicy
from magpie.errors import BackendError, BackendUnavailable, ModelNotFound

T = TypeVar("T")

COOLDOWN_START = 1.0
COOLDOWN_MAX = 30.0


class _Host:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.in_flight = 0
        self.down_until = 0.0
        self.cooldown = COOLDOWN_START
        self.failures = 0

    @property
    def name(self) -> str:
        return self.backend.host or self.backend.model

    def healthy(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + self.cooldown
        self.cooldown = min(COOLDOWN_MAX, self.cooldown * 2)

    def succeeded(self) -> None:
        self.cooldown = COOLDOWN_START
        self.down_until = 0.0


class HostPool(Backend):
    """One backend over several hosts serving the same model."""

    def __init__(self, backends: list[Backend], *, per_host: int = 4) -> None:
        if not backends:
            raise ValueError("HostPool needs at least one backend")
        self._hosts = [_Host(b) for b in backends]
        self.name = backends[0].name
        self.auto_concurrency = sum(b.auto_concurrency for b in backends)
        self.per_host = max(1, per_host)
        self._cond: asyncio.Condition | None = None
        #: Answered chats (pairs) per host.
        self.pairs: Counter[str] = Counter()

    @property
    def model(self) -> str:
        return self._hosts[0].backend.model

    @property
    def host(self) -> str:
        return ",".join(h.name for h in self._hosts)

    @property
    def hosts(self) -> list[str]:
        return [h.name for h in self._hosts]

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _acquire(self, exclude: set[int]) -> _Host | None:
        """The least-loaded healthy host with a free slot (waits for a slot).

        When every candidate is cooling down, the one that comes back first is
        tried (a probe); None when every host was already tried."""
        cond = self._condition()
        async with cond:
            while True:
                now = time.monotonic()
                candidates = [h for i, h in enumerate(self._hosts) if i not in exclude]
                if not candidates:
                    return None
                healthy = [h for h in candidates if h.healthy(now)] or [
                    min(candidates, key=lambda h: h.down_until)
                ]
                free = [h for h in healthy if h.in_flight < self.per_host]
                if free:
                    host = min(free, key=lambda h: h.in_flight)
                    host.in_flight += 1
                    return host
                await cond.wait()

    async def _release(self, host: _Host) -> None:
        cond = self._condition()
        async with cond:
            host.in_flight -= 1
            cond.notify_all()

    async def _dispatch(self, op: Callable[[Backend], Awaitable[T]]) -> T:
        tried: set[int] = set()
        last: BaseException | None = None
        while True:
            host = await self._acquire(tried)
            if host is None:
                assert last is not None
                raise last
            try:
                result = await op(host.backend)
            except (BackendUnavailable, BackendError) as exc:
                if isinstance(exc, BackendError) and not exc.retryable:
                    raise
                host.failed(time.monotonic())
                tried.add(self._hosts.index(host))
                last = exc
                continue
            finally:
                await self._release(host)
            host.succeeded()
            return result

    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        return await self._dispatch(
            lambda b: b.complete(prompt, sampling=sampling, stop=stop, seed=seed, abort=abort)
        )

    def supports_complete_n(self) -> bool:
        return all(h.backend.supports_complete_n() for h in self._hosts)

    async def complete_n(
        self,
        prompt: str,
        n: int,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
    ) -> list[Completion]:
        """One ``n``-sample request on one host (it takes one of the host's slots)."""
        return await self._dispatch(
            lambda b: b.complete_n(prompt, n, sampling=sampling, stop=stop, seed=seed)
        )

    def supports_embed(self) -> bool:
        return all(h.backend.supports_embed() for h in self._hosts)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding request on one healthy host (it takes one of the host's slots)."""
        return await self._dispatch(lambda b: b.embed(texts))

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
        async def op(b: Backend) -> Completion:
            c = await b.chat(
                messages,
                sampling=sampling,
                seed=seed,
                abort=abort,
                json_schema=json_schema,
                think=think,
            )
            if json_schema is None:
                self.pairs[b.host or b.model] += 1
            return c.model_copy(update={"host": b.host})

        return await self._dispatch(op)

    @property
    def render_source(self) -> str:  # type: ignore[override]
        return self._hosts[0].backend.render_source

    def retry_start_requests(
        self, policy: RetryPolicy | None, on_retry: Callable[[str], None] | None = None
    ) -> None:
        """Each host's start-up requests, each retried by ``policy``."""
        super().retry_start_requests(policy, on_retry)
        for host in self._hosts:
            host.backend.retry_start_requests(policy, on_retry)

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The first host's rendering that answers (every host serves one model);
        when none does, the last one's error (each host's requests retried by
        themselves): a busy pool is not a pool that cannot render."""
        last: BaseException | None = None
        for host in self._hosts:
            try:
                return await host.backend.render_chat(messages)
            except (BackendUnavailable, BackendError) as exc:
                last = exc
        assert last is not None
        raise last

    async def probe(self) -> str:
        """Every host answers (the first that does not raises)."""
        return "; ".join([await h.backend.probe() for h in self._hosts])

    async def check_model(self) -> tuple[ModelInfo, str]:
        lines = [await h.backend.check_model() for h in self._hosts]
        return lines[0][0], "; ".join(line for _, line in lines)

    async def describe(self) -> ModelInfo:
        """Describe the model on every host: it must be on each reachable one.

        Unreachable hosts are tolerated (they are retried during the run) as
        long as one answers."""
        infos: list[ModelInfo] = []
        down: list[BaseException] = []
        for host in self._hosts:
            try:
                infos.append(await host.backend.describe())
            except ModelNotFound:
                raise
            except (BackendUnavailable, BackendError) as exc:
                host.failed(time.monotonic())
                down.append(exc)
        busy = [e for e in down if isinstance(e, BackendError)]
        if not infos and busy:  # they answered, but failed after their retries
            raise busy[0]
        if not infos:
            # How to start them is the backend's to say (Ollama's, an
            # OpenAI-compatible server's).
            fix = next((e.fix for e in down if isinstance(e, BackendUnavailable) and e.fix), None)
            raise BackendUnavailable(
                f"none of the {len(self._hosts)} hosts is reachable ({self.host})",
                fix=fix or "start their servers, or pass --host with the ones that run",
            )
        info = infos[0].model_copy(update={"host": self.host})
        info.extra["hosts"] = self.hosts
        info.extra["unreachable_at_start"] = len(down)
        return info

    async def aclose(self) -> None:
        await asyncio.gather(*(h.backend.aclose() for h in self._hosts), return_exceptions=True)
