"""Embeddings from a backend, for semantic dedup (``--semantic-model``).

:class:`BackendEmbedder` turns a backend with an embedding endpoint
(:meth:`~magpie.backends.base.Backend.embed`: Ollama ``/api/embed``,
OpenAI-compatible ``/v1/embeddings``) into the synchronous ``embed`` function
that :class:`~magpie.dedup.DedupIndex` takes, usable from any thread and from
inside a running event loop:

* the backend lives on a dedicated event loop in a thread of its own
  (``magpie-embed``), which owns its connections;
* ``embedder(texts)`` submits the work to that loop and waits for it
  (``magpie dedup``, ``magpie merge``, and rebuilding the index of an existing
  output, which embeds the old records in batches);
* ``await embedder.aembed(texts)`` does the same without blocking the caller's
  event loop: ``magpie generate``'s pipeline awaits the embedding of each new
  instruction and hands it to the index
  (:meth:`~magpie.dedup.DedupIndex.remember_embedding`), so its generation
  requests never wait behind an embedding call on the event loop thread;
* texts go to the server ``batch_size`` (64) per request, each request retried
  with :mod:`magpie.retry` (backends never retry themselves);
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

from magpie.errors import BackendError, MagpieError, UsageError
from magpie.retry import RetryPolicy, call_with_retry

if TYPE_CHECKING:
    from magpie.backends.base import Backend
    from magpie.config import RunConfig

T = TypeVar("T")

#: Texts per embedding request.
EMBED_BATCH = 64
#: Seconds ``close()`` waits for the backend to close and the thread to end.
CLOSE_TIMEOUT = 10.0
#: The text of the start-up probe (its vector is thrown away).
PROBE_TEXT = "magpie semantic dedup probe"


class BackendEmbedder:
    """The ``embed`` function of a :class:`~magpie.dedup.DedupIndex`, over a backend.

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


# -- from the run settings ------------------------------------------------------


def semantic_target(config: RunConfig, generator: str | None = None) -> tuple[str, str | None]:
    """The backend (``ollama`` or ``openai``) and host of the embedding model.

    ``semantic_backend`` and ``semantic_host`` when set.  Otherwise the
    generator's backend (``generator``: the one a run resolved, else
    ``config.backend``) when it is ollama or openai, with its first host; for
    the embedded generator (and ``magpie dedup``/``merge``, which have none),
    Ollama at its default host (``$OLLAMA_HOST`` or http://127.0.0.1:11434).
    A host of None means the backend's default.
    """
    gen = generator or config.backend
    name = config.semantic_backend or (gen if gen in ("ollama", "openai") else "ollama")
    host = config.semantic_host
    if host is None and name == gen:
        host = config.hosts[0]
    return name, host


def validate_semantic(config: RunConfig) -> None:
    """The checks of the semantic settings that need no server (exit 2)."""
    if not config.semantic_model:
        return
    if not config.dedup:
        raise UsageError(
            "--semantic-model needs dedup on: drop --no-dedup (or the setting dedup = false)"
        )
    from magpie.backends.select import looks_like_gguf

    name, host = semantic_target(config)
    # llama-server names its model by the GGUF path it loaded (`/v1/models`):
    # on an OpenAI-compatible server a path is a served model's id.
    if name != "openai" and looks_like_gguf(config.semantic_model):
        raise UsageError(
            f"--semantic-model {config.semantic_model!r} is a file: name an embedding model "
            "on an Ollama or OpenAI-compatible server, e.g. nomic-embed-text"
        )
    if config.semantic_host is None or host is None:
        return
    try:
        if name == "openai":
            from magpie.backends.openai_compat import normalize_host

            normalize_host(host)
        else:
            from magpie.backends.ollama import validate_host

            validate_host(host)
    except UsageError:
        raise UsageError(
            f"--semantic-host {host!r} is not a URL: use e.g. http://127.0.0.1:11434"
        ) from None


def _factory(config: RunConfig, name: str, host: str | None) -> Callable[[], Backend]:
    target = config.model_copy(
        update={"backend": name, "model": config.semantic_model or "", "host": host}
    )

    def make() -> Backend:
        from magpie.backends.select import open_backend

        return open_backend(target)

    return make


def make_embedder(
    config: RunConfig,
    generator: str | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """The embedder of ``config.semantic_model`` (see :func:`semantic_target`),
    not yet probed."""
    if not config.semantic_model:
        raise UsageError("semantic dedup needs --semantic-model")
    name, host = semantic_target(config, generator)
    return BackendEmbedder(
        _factory(config, name, host),
        retry=config.retry,
        on_retry=on_retry,
    )


def open_embedder(
    config: RunConfig,
    generator: str | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """:func:`make_embedder`, probed (exit 3 at once when the server is down or
    lacks the model; the embedder is closed then)."""
    embedder = make_embedder(config, generator, on_retry)
    try:
        embedder.probe()
    except BaseException:
        embedder.close()
        raise
    return embedder


async def aopen_embedder(
    config: RunConfig,
    generator: str | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> BackendEmbedder:
    """:func:`open_embedder` for coroutines (the caller's loop runs on meanwhile)."""
    embedder = await asyncio.to_thread(make_embedder, config, generator, on_retry)
    try:
        await embedder.aprobe()
    except BaseException:
        await embedder.aclose()
        raise
    return embedder


def semantic_config(flags: dict[str, Any]) -> RunConfig:
    """The semantic settings of ``magpie dedup`` and ``magpie merge``: their
    flags over the ``MAGPIE_SEMANTIC_*`` variables, validated (exit 2).
    Without a generator, the embedding model is on Ollama at its default host
    unless ``--semantic-backend``/``--semantic-host`` say otherwise."""
    import os

    from magpie.config import build_config

    environ = {k: v for k, v in os.environ.items() if k.startswith("MAGPIE_SEMANTIC_")}
    config = build_config(flags, environ=environ)
    validate_semantic(config)
    return config
