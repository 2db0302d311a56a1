"""What an engine serves: jobs, their queue, sequences in slots, cached cells."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from magpie.backends.base import AbortCheck, Completion, Sampling
from magpie.errors import BackendError

#: How long an idle worker waits for a job before it checks the closing flag.
IDLE_POLL = 0.2


@dataclass(eq=False)
class _Job:
    """One request, from the caller's event loop to the worker thread and back."""

    prompt: list[int]
    stop: list[bytes]
    sampling: Sampling
    seed: int
    abort: AbortCheck | None
    grammar: str | None
    #: Whether this prompt may become the shared prefix (raw pre-query requests).
    prefix_candidate: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    #: Set (from the event loop) when the caller stopped waiting.
    cancelled: bool = False

    def resolve(self, result: Completion | BaseException) -> None:
        """Hand ``result`` to the waiting coroutine (from any thread)."""

        def deliver() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            self.loop.call_soon_threadsafe(deliver)


@dataclass(eq=False)
class _Sequence:
    """A job being decoded in one slot (KV stream) of the batch context."""

    slot: int
    job: _Job
    sampler: Any
    #: Tokens still to decode (prompt tokens, then the last sampled token).
    feed: list[int]
    #: The tokens whose KV cells the slot holds, positions 0, 1, ...
    history: list[int]
    #: Completion tokens allowed (max_tokens, cut to the context).
    limit: int
    tokens: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Cached:
    """The KV cells a finished sequence left in its slot, now free, for a later
    prompt that begins the same way (llama-server's prompt cache, per slot)."""

    tokens: list[int]
    #: Left by a raw completion (an instruction): the chat answering it, whose
    #: prompt continues these tokens, is likely to come next.
    hinted: bool
    #: Length of that completion's prompt (the pre-query).
    prompt_len: int
    #: The engine step it was left at.
    step: int


def _closed_error() -> BackendError:
    return BackendError("the embedded backend was closed", retryable=False, cause="closed")


class _JobQueue:
    """The jobs routed to one engine, waiting for a slot, and its closing flag."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.closing = threading.Event()
        #: Held while a job is queued and while it is drained at exit, so that
        #: no job can be queued after the final drain.
        self._lock = threading.Lock()

    def put(self, job: _Job) -> None:
        """Queue ``job`` (raises ``BackendError`` once closing)."""
        with self._lock:
            if self.closing.is_set():
                raise _closed_error()
            self._queue.put(job)

    def get(self, wait: bool) -> _Job | None:
        """The next job not given up by its caller, or None (none yet; closing)."""
        while True:
            try:
                job = self._queue.get(block=wait, timeout=IDLE_POLL if wait else None)
            except queue.Empty:
                return None
            if job is None or not job.cancelled:
                return job

    def waiting(self) -> int:
        """How many jobs are queued (about: some may have been given up)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Set the closing flag and wake the worker if it is idle."""
        with self._lock:
            self.closing.set()
        self._queue.put(None)

    def drain(self) -> None:
        """Close, and fail every job still queued."""
        with self._lock:
            self.closing.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.resolve(_closed_error())
