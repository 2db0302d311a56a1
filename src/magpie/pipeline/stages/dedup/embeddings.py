"""Embeddings from a backend, for semantic dedup (``--semantic-model``).

:class:`BackendEmbedder` turns a backend with an embedding endpoint
(:meth:`~magpie.backends.base.Backend.embed`: Ollama ``/api/embed``,
OpenAI-compatible ``/v1/embeddings``) into the synchronous ``embed`` function
that :class:`~magpie.pipeline.stages.dedup.index.DedupIndex` takes, usable from any thread and from
inside a running event loop:

* the backend lives on a dedicated event loop in a thread of its own
  (``magpie-embed``), which owns its connections;
* ``embedder(texts)`` submits the work to that loop and waits for it
  (``magpie dedup``, ``magpie merge``, and rebuilding the index of an existing
  output, which embeds the old records in batches);
* ``await embedder.aembed(texts)`` does the same without blocking the caller's
  event loop: ``magpie generate``'s pipeline awaits the embedding of each new
  instruction and hands it to the index
  (:meth:`~magpie.pipeline.stages.dedup.index.DedupIndex.remember_embedding`), so its generation
  requests never wait behind an embedding call on the event loop thread;
* texts go to the server ``batch_size`` (64) per request, each request retried
  with :mod:`magpie.backends.retry` (backends never retry themselves);
* :meth:`BackendEmbedder.close` cancels what is left, closes the backend on its
  loop and ends the thread.

:func:`open_embedder` builds one from the run settings (``semantic_model``,
``semantic_backend``, ``semantic_host``: by default the generator's backend and
first host when it is Ollama or OpenAI-compatible, else Ollama at its default
host) and probes it once, so that an unknown model or an unreachable server
stops the command at once with exit 3, before any work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import BackendError, MagpieError, UsageError

if TYPE_CHECKING:
    from magpie.backends.base import Backend
    from magpie.backends.spec import BackendSpec

T = TypeVar("T")

#: Texts per embedding request.
EMBED_BATCH = 64
#: Seconds ``close()`` waits for the backend to close and the thread to end.
CLOSE_TIMEOUT = 10.0
#: The text of the start-up probe (its vector is thrown away).
PROBE_TEXT = "magpie semantic dedup probe"


class BackendEmbedder:
    """The ``embed`` function of a :class:`~magpie.pipeline.stages.dedup.index.DedupIndex`, over a backend.

    ``factory`` makes the backend; it is called on the embedder's own event
    loop thread, where every request of the backend then runs.  ``retry`` is
    the policy of each request (default :class:`RetryPolicy`); until the first
    request succeeds, an unreachable server is not waited for
    (``unreachable_budget`` 0: exit 3 at once).  ``on_retry`` is called with
    the cause of each retry, on the embedder's thread.
    """

    def __init__(
        self,
        factory: Callable[[], Backend],
        *,
        retry: RetryPolicy | None = None,
        batch_size: int = EMBED_BATCH,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.on_retry = on_retry
        self._closed = False
        #: Whether a request has succeeded: until then an unreachable server
        #: fails at once (exit 3) instead of being waited for.
        self._reached = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="magpie-embed", daemon=True)
        self._thread.start()
        self.backend: Backend | None = None
        try:
            self.backend = self._submit(self._make(factory)).result()
            if not self.backend.supports_embed():
                raise UsageError(
                    f"semantic dedup needs an embedding endpoint; the {self.backend.name} "
                    "backend has none (use --semantic-backend ollama or openai)"
                )
        except BaseException:
            self.close()
            raise

    # -- the loop thread ------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @staticmethod
    async def _make(factory: Callable[[], Backend]) -> Backend:
        return factory()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("the embedder is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- embedding ------------------------------------------------------------

    @property
    def model(self) -> str:
        """The embedding model's name."""
        return self.backend.model if self.backend is not None else ""

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order; blocks the calling thread (not the
        embedder's own: that would wait for itself forever)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("BackendEmbedder called from its own event loop thread")
        return self._wait(self._submit(self._embed(list(texts))))

    async def aembed(self, texts: Sequence[str]) -> list[list[float]]:
        """:meth:`__call__` for coroutines: the caller's event loop runs on
        while the embedder's thread makes the requests.  Cancelling the caller
        cancels the requests."""
        return await asyncio.wrap_future(self._submit(self._embed(list(texts))))

    def probe(self) -> int:
        """Embed one short text, with no patience for an unreachable server:
        raises :class:`~magpie.errors.ModelNotFound` or
        :class:`~magpie.errors.BackendUnavailable` (exit 3) at once.  Returns
        the vectors' dimension."""
        return self._wait(self._submit(self._probe()))

    async def aprobe(self) -> int:
        """:meth:`probe` for coroutines."""
        return await asyncio.wrap_future(self._submit(self._probe()))

    @staticmethod
    def _wait(future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C while waiting: the request is abandoned
            raise

    async def _probe(self) -> int:
        self._reached = False
        vectors = await self._embed([PROBE_TEXT])
        return len(vectors[0])

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        backend = self.backend
        assert backend is not None
        out: list[list[float]] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                policy = (
                    self.retry
                    if self._reached
                    else self.retry.model_copy(update={"unreachable_budget": 0.0})
                )
                vectors = await call_with_retry(
                    lambda b=batch: backend.embed(b),  # type: ignore[misc]
                    policy,
                    self.on_retry,
                )
                if len(vectors) != len(batch):
                    raise BackendError(
                        f"{len(vectors)} embeddings came back for {len(batch)} texts",
                        retryable=False,
                        cause="bad_reply",
                    )
                self._reached = True
                out.extend(vectors)
        except MagpieError as exc:
            if not exc.message.startswith("semantic dedup"):
                exc.message = f"semantic dedup: {exc.message}"
                exc.args = (exc.message,)
            raise
        return out

    # -- closing --------------------------------------------------------------

    def close(self) -> None:
        """Cancel requests in flight, close the backend, end the thread.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):  # closing is best effort
                done.result(timeout=CLOSE_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self.backend is not None:
            await self.backend.aclose()
        await self._loop.shutdown_asyncgens()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the caller's event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> BackendEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- opening one -----------------------------------------------------------------


def make_embedder(
    spec: BackendSpec,
    retry: RetryPolicy,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """The embedder of the embedding model ``spec`` names (``RunConfig.semantic_spec``),
    not yet probed; its backend opens on the embedder's own loop."""
    if not spec.model:
        raise UsageError("semantic dedup needs --semantic-model")

    def make() -> Backend:
        from magpie.backends.registry import open_backend

        return open_backend(spec)

    return BackendEmbedder(make, retry=retry, on_retry=on_retry)


def open_embedder(
    spec: BackendSpec,
    retry: RetryPolicy,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """:func:`make_embedder`, probed (exit 3 at once when the server is down or
    lacks the model; the embedder is closed then)."""
    embedder = make_embedder(spec, retry, on_retry)
    try:
        embedder.probe()
    except BaseException:
        embedder.close()
        raise
    return embedder


async def aopen_embedder(
    spec: BackendSpec,
    retry: RetryPolicy,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """:func:`open_embedder` for coroutines (the caller's loop runs on meanwhile)."""
    embedder = await asyncio.to_thread(make_embedder, spec, retry, on_retry)
    try:
        await embedder.aprobe()
    except BaseException:
        await embedder.aclose()
        raise
    return embedder
