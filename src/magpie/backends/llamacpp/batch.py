"""The batched embedded backend: many sequences decoded at once by llama.cpp.

The engines and their determinism and memory are described in
:mod:`magpie.backends.llamacpp.engine`; chats are rendered by
:mod:`magpie.backends.llamacpp.prompts`.
"""

from __future__ import annotations

import asyncio
import random
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

from magpie.backends.base import AbortCheck, Completion, Sampling
from magpie.backends.llamacpp.engine import (
    AFFINITY_SIZE,
    COUNTERS,
    DEFAULT_MAX_BATCH,
    DEFAULT_N_BATCH,
    METADATA_N_CTX,
    _Workers,
    default_workers,
)
from magpie.backends.llamacpp.jobs import _closed_error, _Job
from magpie.backends.llamacpp.model import EmbeddedBackend
from magpie.backends.llamacpp.prompts import common_prefix, raw_prompt_tokens, render_chat
from magpie.errors import UsageError

__all__ = ["BatchedEmbeddedBackend", "common_prefix", "render_chat"]


class BatchedEmbeddedBackend(EmbeddedBackend):
    """llama-cpp-python in process, decoding up to ``max_batch`` requests at once.

    Same model, ``name`` and ``describe()`` as :class:`EmbeddedBackend`, and the
    same text for the same request and seed as ``llama_cpp.Llama`` with flash
    attention on (``flash_attn``, the default: ~20% faster, and it lets prompts
    reuse the cells of generated tokens).  The ``max_batch`` slots are split
    over ``workers`` engines (threads with their own llama.cpp context on the
    shared model weights) of ``n_threads // workers`` threads each; a request
    goes to the engine that holds the cells its prompt begins with, else to the
    least busy one.  ``n_ctx`` is the context of each sequence: the KV caches hold
    ``(max_batch + workers) * n_ctx`` tokens.  Run the pipeline with
    ``concurrency >= max_batch`` to keep the slots full.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        workers: int | None = None,
        n_batch: int = DEFAULT_N_BATCH,
        share_prefix: bool = True,
        flash_attn: bool = True,
    ) -> None:
        super().__init__(model_path, n_ctx=n_ctx, n_threads=n_threads)
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, not {max_batch}")
        self.max_batch = max_batch
        workers = workers or default_workers(self._n_threads)
        self.workers = max(1, min(workers, max_batch, self._n_threads))
        self._n_batch = n_batch
        self._share_prefix = share_prefix
        self._flash_attn = flash_attn
        self._workers: _Workers | None = None
        self._closed = False
        #: Completion text -> the engine that generated it: a chat quoting it
        #: goes to that engine, whose cells for it are then reused.
        self._affinity: OrderedDict[str, int] = OrderedDict()

    @property
    def threads_per_engine(self) -> int:
        """``n_threads`` split over the engines a full batch would have, even
        when fewer run (``max_batch`` 1): one engine never takes every core.
        With 2 threads on 2 cores, llama.cpp's spinning threads fight the
        Python thread that drives them and decoding collapses (2.5-7 tok/s
        against 29-53 with 1: ``--concurrency 1`` cost 35.7 CPU seconds a
        pair instead of 2.4)."""
        return max(1, self._n_threads // default_workers(self._n_threads))

    def _llama_options(self) -> dict[str, Any]:
        """The ``Llama`` this backend loads serves metadata, the tokenizer and
        the chat template only: the engines decode in contexts of their own."""
        return {"n_ctx": METADATA_N_CTX, "n_threads": self._n_threads}

    def _start_workers(self) -> _Workers:
        """The engines, started on first use (in a thread: loading is slow)."""
        llm = self.llm
        with self._lock:
            if self._closed:
                raise _closed_error()
            if self._workers is None:
                self._workers = _Workers(
                    llm,
                    self.workers,
                    self.threads_per_engine,
                    n_ctx=self._n_ctx,
                    max_batch=self.max_batch,
                    n_batch=self._n_batch,
                    share_prefix=self._share_prefix,
                    flash_attn=self._flash_attn,
                )
                # Stop the engines before the interpreter (or the GC) frees the model.
                weakref.finalize(self, self._workers.close)
            return self._workers

    def kv_stats(self) -> dict[str, int]:
        """Counters summed over the engines (for benchmarks): prompt tokens whose
        KV cells were reused in place or copied, tokens decoded, decode calls,
        sequences moved to close a gap."""
        total = dict.fromkeys(COUNTERS, 0)
        for engine in self._workers.engines if self._workers is not None else []:
            for key in COUNTERS:  # every key is there from the start: no resizing
                total[key] += engine.counts[key]
        return total

    async def _ready(self) -> _Workers:
        if self._closed:
            raise _closed_error()
        if self._workers is not None:
            return self._workers
        return await asyncio.to_thread(self._start_workers)

    async def _generate(
        self,
        workers: _Workers,
        tokens: list[int],
        stop: list[str],
        sampling: Sampling,
        seed: int | None,
        abort: AbortCheck | None,
        grammar: str | None,
        prefix_candidate: bool,
        prefer: int | None = None,
    ) -> Completion:
        loop = asyncio.get_running_loop()
        job = _Job(
            prompt=tokens,
            stop=[s.encode("utf-8") for s in stop if s],
            sampling=sampling,
            seed=seed if seed is not None else random.getrandbits(32),
            abort=abort,
            grammar=grammar,
            prefix_candidate=prefix_candidate,
            loop=loop,
            future=loop.create_future(),
        )
        engine = workers.submit(job, prefer)
        try:
            result = await job.future
        finally:
            job.cancelled = True  # done or abandoned: the workers drop it either way
        key = result.text.strip()
        if key:
            self._affinity[key] = engine
            while len(self._affinity) > AFFINITY_SIZE:
                self._affinity.popitem(last=False)
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
        workers = await self._ready()
        tokens = raw_prompt_tokens(workers.llm, prompt)
        return await self._generate(workers, tokens, stop, sampling, seed, abort, None, True)

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
        # ``think``: the GGUF's chat template is rendered as it is; a model that
        # reasons writes it inline (<think>...</think>), split by the pipeline.
        workers = await self._ready()
        rendered = render_chat(workers.llm, messages, json_schema)
        prefer = next(
            (
                self._affinity[m["content"].strip()]
                for m in reversed(messages)
                if isinstance(m.get("content"), str) and m["content"].strip() in self._affinity
            ),
            None,
        )
        return await self._generate(
            workers,
            rendered.tokens,
            rendered.stop,
            sampling,
            seed,
            abort,
            rendered.grammar,
            False,
            prefer,
        )

    async def aclose(self) -> None:
        """Stop the engines (requests not finished fail with ``BackendError``),
        then free the model.  Each context is freed by its engine's thread after
        its last ``llama_decode``; the model only once those threads have ended."""
        self._closed = True

        def close() -> None:
            with self._lock:
                workers, self._workers = self._workers, None
            if workers is not None:
                workers.close()
            with self._lock:
                llm, self._llm = self._llm, None
            if llm is not None and hasattr(llm, "close"):
                llm.close()

        await asyncio.to_thread(close)
