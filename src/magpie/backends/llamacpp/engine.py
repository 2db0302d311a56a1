"""The batched embedded backend: many sequences decoded at once by llama.cpp.

:class:`BatchedEmbeddedBackend` serves the same GGUF model as
:class:`~magpie.backends.llamacpp.model.EmbeddedBackend`, but concurrent ``complete()``
and ``chat()`` calls (the pipeline keeps ``concurrency`` attempts in flight) are
queued to worker threads ("engines") that run *continuous batching* with
llama.cpp's low-level API, as llama.cpp's own ``batched`` example and
``llama-server`` do:

* every sequence has its own KV-cache stream (``kv_unified = false``) and its
  own llama.cpp sampler chain, seeded from the request's seed;
* each ``llama_decode`` call feeds one token of every sequence that is
  generating, plus prompt tokens of sequences that are starting (up to
  ``n_batch`` tokens), so one pass over the weights serves many tokens;
* a new request takes a slot as soon as one frees up; sequences are kept in
  consecutive slots (llama.cpp runs consecutive sequence ids in one pass);
* prompts are not evaluated twice: the pre-query, identical for every
  instruction request, is evaluated once into a spare "prefix" stream and
  copied to new sequences (``llama_memory_seq_cp``); and a finished sequence
  leaves its cells in its slot for the next prompt that begins the same way,
  above all the chat that answers the instruction just generated there (its
  prompt is the pre-query, the instruction, and a few template tokens).

On 2 cores there are two engines of one thread each, each with its own context
on the shared model weights: llama.cpp's threads meet at a spinning barrier
after every operation, so a two-thread context stalls whenever the machine is
busy, while two engines never wait for each other.

Determinism: on llama.cpp's CPU backend the logits of one sequence are
bit-identical whether it is decoded alone or next to other sequences, *as long
as every sequence has its own KV stream* (in a unified cache a sequence's cells
land at other indices, the attention sums round differently and greedy picks
change).  With flash attention (the default) a token's KV cells and logits are
moreover the same whether it was evaluated alone or in a multi-token prompt
pass (without it they differ), so reused cells change nothing and neither does
how a prompt is split into passes.  Checked by the tests and by
``benchmarks/embedded_throughput.py --check-invariance``.  The sampler chain is
the one ``llama_cpp.Llama`` builds (penalties, top-k, typical, top-p, min-p,
temperature, ``dist(seed)``; greedy at temperature 0), so a request's text
depends only on its prompt, sampling settings and seed, whatever shares the
batch or the engine, and equals what ``llama_cpp.Llama(flash_attn=True)``
returns for it (``EmbeddedBackend`` turns flash attention on too, so both
give the same text).
With ``flash_attn=False`` texts are still batch-invariant (each prompt is
then evaluated alone, in fixed passes), but no longer guaranteed equal to
``Llama``'s, and finished sequences' cells are not reused.  Two deliberate
differences from ``Llama``: a token whose text is longer than 32 bytes is kept
(``Llama`` drops it), and ``max_tokens`` is never exceeded (``Llama`` runs past
it while a UTF-8 character is incomplete).

Memory: the KV caches hold ``(max_batch + workers) * n_ctx`` tokens (23 KB a
token for SmolLM2-135M: RSS 1.2 GB at the defaults, 1.9 GB at ``max_batch=16``).
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from typing import Any

from magpie.backends.base import Completion, FinishReason
from magpie.backends.llamacpp.jobs import _Cached, _closed_error, _Job, _JobQueue, _Sequence
from magpie.backends.llamacpp.model import _llama_cpp, context_overflow
from magpie.backends.llamacpp.prompts import common_prefix
from magpie.errors import BackendError, UsageError

#: Default number of sequences decoded together.
DEFAULT_MAX_BATCH = 8
#: Tokens fed to one ``llama_decode`` call at most (generation plus prompts).
DEFAULT_N_BATCH = 512
#: A shared prompt prefix shorter than this is evaluated again rather than
#: copied (a copy moves the whole KV stream, so it only pays for longer prefixes).
MIN_SHARED_PREFIX = 8
#: Completions remembered for routing the chats that quote them.
AFFINITY_SIZE = 1024
#: For this many decode steps a finished instruction's cells are kept for the
#: chat that answers it: no other job takes its slot unless it reuses more.
CACHE_GRACE_STEPS = 8
#: What each engine counts (read by ``BatchedEmbeddedBackend.kv_stats``).
COUNTERS = (
    "prompt_tokens_reused",
    "prompt_tokens_copied",
    "tokens_decoded",
    "decode_calls",
    "sequences_moved",
)
#: The ``abort`` check runs every this many generated tokens.
ABORT_EVERY = 8
#: ``llama_cpp.Llama`` penalises repeats within this many last tokens.
PENALTY_LAST_N = 64
#: The ``Llama`` object only serves metadata, tokenizer and chat template: its
#: own context (and KV cache) is kept tiny; generation uses the batch context.
METADATA_N_CTX = 64


class _BatchEngine:
    """A worker thread and the llama.cpp batch context it alone touches.

    It takes the jobs routed to it whenever it has a free slot; several engines
    on one model decode in parallel, each on its own threads (``llama_decode``
    releases the GIL).
    """

    def __init__(
        self,
        llm: Any,
        *,
        n_ctx: int,
        n_threads: int,
        max_batch: int,
        n_batch: int,
        share_prefix: bool,
        flash_attn: bool = True,
    ) -> None:
        self.L = _llama_cpp()
        self.llm = llm
        self.max_batch = max_batch
        self.n_batch = max(n_batch, max_batch)
        # The prefix copies need flash attention (see _place_alone).
        self.share_prefix = share_prefix and flash_attn
        #: The spare sequence id (KV stream) that holds the shared prefix.
        self.prefix_seq = max_batch
        n_seq = max_batch + (1 if self.share_prefix else 0)
        self.vocab = llm._model.vocab  # noqa: SLF001
        self.bos = llm.token_bos()
        self.ctx = self._new_context(llm, n_ctx, n_threads, n_seq, flash_attn)
        self.n_ctx_seq = int(self.L.llama_n_ctx_seq(self.ctx))
        self.memory = self.L.llama_get_memory(self.ctx)
        self.batch = self.L.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._prefix: list[int] = []
        self._active: dict[int, _Sequence] = {}
        # A finished sequence's cells stay in its slot for a later prompt that
        # begins the same way (its instruction, for a chat).  Only with flash
        # attention: without it a token's KV and logits differ (by rounding)
        # between a one-token pass and a multi-token one, so reused cells would
        # change the results; with it they are bit-identical.
        self.flash_attn = flash_attn
        self._cached: dict[int, _Cached] = {}
        self._steps = 0
        #: Counters for benchmarks: prompt tokens whose cells were reused in
        #: place or copied, tokens decoded, decode calls, sequences moved.
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._jobs = _JobQueue()
        self._closing = self._jobs.closing
        self._thread = threading.Thread(target=self._run, name="magpie-batch", daemon=True)
        self._thread.start()

    def _new_context(
        self, llm: Any, n_ctx: int, n_threads: int, n_seq: int, flash_attn: bool
    ) -> Any:
        L = self.L
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        # One KV stream per sequence: what makes a sequence's logits independent
        # of its neighbours (a shared stream interleaves their cells, and the
        # attention sums then round differently).
        params.kv_unified = False
        # Flash attention: ~20% faster at 8-16 sequences on CPU, and invariant
        # to how prompts are split into passes (see the module docstring).
        params.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        ctx = L.llama_init_from_model(llm._model.model, params)  # noqa: SLF001
        if not ctx:
            raise UsageError(
                f"cannot create a llama.cpp context for {n_seq} sequences of {n_ctx} tokens "
                "(out of memory?); lower --n-ctx or the batch size"
            )
        return ctx

    # -- the caller's side ---------------------------------------------------

    def submit(self, job: _Job) -> None:
        """Queue ``job`` for this engine (raises ``BackendError`` once closing)."""
        self._jobs.put(job)

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def load(self) -> float:
        """Jobs running or queued here, per slot."""
        return (len(self._active) + self._jobs.waiting()) / self.max_batch

    def has_room(self) -> bool:
        return len(self._active) + self._jobs.waiting() < self.max_batch

    def stop(self) -> None:
        """Ask the worker to stop after its current decode."""
        self._jobs.close()

    def close(self) -> None:
        """Stop after the current decode; wait until the thread has ended (it
        frees the context itself, after its last ``llama_decode``).  Jobs not
        finished fail with ``BackendError``."""
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # -- the worker thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._admit()
                self._drop_cancelled()
                self._compact()
                if self._active and not self._closing.is_set():
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting caller
            error = BackendError(
                f"embedded batch decoding failed: {type(exc).__name__}: {exc}", retryable=False
            )
            for seq in list(self._active.values()):
                self._release(seq)
                seq.job.resolve(error)
        finally:
            self._jobs.drain()
            for seq in list(self._active.values()):
                self._release(seq)
                seq.job.resolve(_closed_error())
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None

    def _admit(self) -> None:
        """Move queued jobs into free slots; wait a little for one when idle."""
        wait = not self._active
        while len(self._active) < self.max_batch:
            job = self._jobs.get(wait)
            if job is None:
                return  # nothing queued, or closing
            wait = False
            try:
                self._start(job)
            except Exception as exc:  # noqa: BLE001 - the job fails, the worker goes on
                job.resolve(exc)

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.max_batch) if s not in self._active]

    def _reserved(self, slot: int) -> bool:
        """Whether ``slot`` holds a recent instruction's cells, kept for its chat."""
        c = self._cached.get(slot)
        return c is not None and c.hinted and self._steps - c.step < CACHE_GRACE_STEPS

    def _start(self, job: _Job) -> None:
        n = len(job.prompt)
        if n == 0:
            raise BackendError("empty prompt", retryable=False, cause="empty_prompt")
        if n >= self.n_ctx_seq:
            # No room for a token after it: refused, never cut.  A prompt that
            # fits generates until max_tokens or the end of the context,
            # whichever comes first (finish reason "length" either way).
            raise context_overflow(n, self.n_ctx_seq)
        sampler = self._sampler(job)
        try:
            slot, shared = self._place(job) if self.flash_attn else self._place_alone(job)
        except BaseException:
            self.L.llama_sampler_free(sampler)
            raise
        self._active[slot] = _Sequence(
            slot=slot,
            job=job,
            sampler=sampler,
            feed=job.prompt[shared:],
            history=job.prompt[:shared],
            limit=min(job.sampling.max_tokens, self.n_ctx_seq - n),
        )

    def _place(self, job: _Job) -> tuple[int, int]:
        """Choose a free slot for ``job`` and put the KV cells of as much of its
        prompt there as are at hand: left in the slot by an earlier sequence
        (used in place), or copied from the prefix stream.  Returns the slot and
        the number of prompt tokens whose cells it holds."""
        prompt = job.prompt
        last = len(prompt) - 1  # the last prompt token is decoded for its logits
        free = self._free_slots()
        # (tokens reused, not an instruction's, lowest slot) of each slot with cells.
        fits: dict[int, tuple[int, bool, int]] = {}
        for slot in free:
            cached = self._cached.get(slot)
            if cached is not None:
                n = min(common_prefix(prompt, cached.tokens), last)
                fits[slot] = (n, not cached.hinted, -slot)
        # A recent instruction's cells are for the chat that continues them.
        allowed = {
            slot: fit
            for slot, fit in fits.items()
            if not self._reserved(slot) or fit[0] > self._cached[slot].prompt_len
        }
        if not any(slot not in fits or slot in allowed for slot in free):
            allowed = fits  # every free slot is reserved: take the best anyway
        best = max(allowed, key=allowed.__getitem__, default=None)
        if best is not None and fits[best][0] >= MIN_SHARED_PREFIX:
            n = fits[best][0]
            self.counts["prompt_tokens_reused"] += n
            del self._cached[best]
            self.L.llama_memory_seq_rm(self.memory, best, n, -1)
            return best, n
        slot = min(free, key=lambda s: (self._reserved(s), s))
        self._clear(slot)
        return slot, self._copy_prefix(job, slot) if self.share_prefix else 0

    def _place_alone(self, job: _Job) -> tuple[int, int]:
        """Without flash attention a token's results depend on whether it was
        evaluated in a one-token pass or a longer one, so each prompt gets the
        same passes whatever else is running: all but its last token evaluated
        alone, in fixed chunks from position 0, no cells shared; the last one
        joins the batch (a one-token pass, like every generated token)."""
        slot = self._free_slots()[0]
        self._clear(slot)
        self._evaluate(slot, job.prompt[:-1])
        return slot, len(job.prompt) - 1

    def _evaluate(self, seq_id: int, tokens: list[int]) -> None:
        """Evaluate ``tokens`` into ``seq_id``'s empty stream, in their own
        ``llama_decode`` calls of ``n_batch`` tokens (no logits needed)."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self._fill([(t, start + i, seq_id, False) for i, t in enumerate(chunk)])
            self._decode()

    def _clear(self, slot: int) -> None:
        """Empty ``slot``'s KV stream."""
        self._cached.pop(slot, None)
        self.L.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def _copy_prefix(self, job: _Job, slot: int) -> int:
        """Copy the shared prefix's KV cells into ``slot`` (empty); return how
        many tokens of the prompt they cover (0: the prompt is evaluated in full)."""
        prompt = job.prompt
        common = common_prefix(prompt, self._prefix)
        if job.prefix_candidate and common < len(prompt) - 1 and len(prompt) > MIN_SHARED_PREFIX:
            self._load_prefix(prompt[:-1])
            common = len(prompt) - 1
        use = min(common, len(prompt) - 1)  # the last prompt token is decoded for its logits
        if use < MIN_SHARED_PREFIX:
            return 0
        L = self.L
        self.counts["prompt_tokens_copied"] += use
        L.llama_memory_seq_cp(self.memory, self.prefix_seq, slot, -1, -1)
        if use < len(self._prefix):
            L.llama_memory_seq_rm(self.memory, slot, use, -1)
        return use

    def _load_prefix(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` into the prefix stream (no logits needed)."""
        self.L.llama_memory_seq_rm(self.memory, self.prefix_seq, -1, -1)
        self._prefix = []
        self._evaluate(self.prefix_seq, tokens)
        self._prefix = list(tokens)

    def _sampler(self, job: _Job) -> Any:
        """The sampler chain ``llama_cpp.Llama`` builds for these settings."""
        L = self.L
        s = job.sampling
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = L.llama_sampler_chain_add
        n_vocab = L.llama_vocab_n_tokens(self.vocab)
        add(
            chain,
            L.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, s.repeat_penalty or 1.0, 0.0, 0.0
            ),
        )
        if job.grammar is not None:
            grammar = L.llama_sampler_init_grammar(self.vocab, job.grammar.encode(), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise BackendError("invalid grammar for the JSON schema", retryable=False)
            add(chain, grammar)
        if s.temperature == 0.0:
            add(chain, L.llama_sampler_init_greedy())
        else:
            add(chain, L.llama_sampler_init_top_k(s.top_k or 0))
            add(chain, L.llama_sampler_init_typical(1.0, 1))
            add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
            add(chain, L.llama_sampler_init_min_p(s.min_p or 0.0, 1))
            add(chain, L.llama_sampler_init_temp(s.temperature))
            add(chain, L.llama_sampler_init_dist(job.seed & 0xFFFFFFFF))
        return chain

    def _compact(self) -> None:
        """Keep the sequences in the lowest slots, without gaps.

        llama.cpp decodes the sequences of a non-unified cache in passes of
        consecutive sequence ids: every gap costs one more pass over the weights
        (a whole decode step's fixed cost).  New jobs fill the lowest free slots;
        when none is waiting, the sequence in the highest slot moves down into
        the lowest free one (its KV stream copied cell for cell, so its results
        do not change), unless that slot keeps an instruction's cells for its
        chat.
        """
        if not self._active or len(self._active) == self.max_batch or self._jobs.waiting():
            return
        targets = [s for s in self._free_slots() if not self._reserved(s)]
        high = max(self._active)
        if not targets or targets[0] > high:
            return
        low = targets[0]
        seq = self._active[high]
        if not seq.tokens:
            return  # not decoded yet since it started: a prefix copy may be pending
        L = self.L
        self._clear(low)
        L.llama_memory_seq_cp(self.memory, high, low, -1, -1)
        L.llama_memory_seq_rm(self.memory, high, -1, -1)
        self.counts["sequences_moved"] += 1
        del self._active[high]
        seq.slot = low
        self._active[low] = seq

    def _drop_cancelled(self) -> None:
        for seq in list(self._active.values()):
            if seq.job.cancelled:
                self._release(seq)

    def _release(self, seq: _Sequence, keep: bool = False) -> None:
        """Free ``seq``'s slot; ``keep`` leaves its KV cells there for reuse."""
        self._active.pop(seq.slot, None)
        if seq.sampler is not None:
            self.L.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if self.ctx is None:
            return
        if keep and self.flash_attn:
            job = seq.job
            self._cached[seq.slot] = _Cached(
                seq.history, job.prefix_candidate, len(job.prompt), self._steps
            )
        else:
            self._clear(seq.slot)

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq_id, logits) in enumerate(items):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = logits
        b.n_tokens = len(items)

    def _decode(self) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _step(self) -> None:
        """One ``llama_decode``: a token of every generating sequence first, then
        prompt chunks of starting ones; then sample where logits came out."""
        items: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Sequence, int]] = []
        budget = self.n_batch
        for seq in sorted(self._active.values(), key=lambda q: (len(q.feed) > 1, q.slot)):
            take = min(len(seq.feed), budget)
            if take == 0:
                break
            done = take == len(seq.feed)
            pos = len(seq.history)
            for k in range(take):
                items.append((seq.feed[k], pos + k, seq.slot, done and k == take - 1))
            if done:
                outputs.append((seq, len(items) - 1))
            seq.history.extend(seq.feed[:take])
            seq.feed = seq.feed[take:]
            budget -= take
        self._fill(items)
        self._decode()
        self._steps += 1
        self.counts["decode_calls"] += 1
        self.counts["tokens_decoded"] += len(items)
        for seq, index in outputs:
            try:
                token = self.L.llama_sampler_sample(seq.sampler, self.ctx, index)
                self._advance(seq, token)
            except Exception as exc:  # noqa: BLE001 - e.g. the caller's abort check failed
                self._release(seq)
                seq.job.resolve(exc)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self.L.llama_token_to_piece(self.vocab, token, buf, size, 0, False)
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = piece
        return piece

    def _skip(self, seq: _Sequence) -> int:
        """Bytes to skip at the start of the completion: ``Llama.detokenize``
        drops the space after a leading BOS token."""
        return int(bool(seq.tokens) and seq.tokens[0] == self.bos and seq.data[:1] == b" ")

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take a sampled token: finish the sequence or feed it back."""
        if self.L.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop")
            return
        before = len(seq.data)
        seq.tokens.append(token)
        seq.data += self._piece(token)
        skip = self._skip(seq)
        # Only a stop string that ends in the new bytes can be new.
        hits = (seq.data.find(s, max(skip, before - len(s) + 1)) for s in seq.job.stop)
        cut = min((i for i in hits if i >= 0), default=-1)
        if cut >= 0:
            self._finish(seq, "stop", end=cut)
        elif len(seq.tokens) >= seq.limit:
            self._finish(seq, "length")
        elif self._aborted(seq, skip):
            self._finish(seq, "abort")
        else:
            seq.feed = [token]

    @staticmethod
    def _aborted(seq: _Sequence, skip: int) -> bool:
        abort = seq.job.abort
        if abort is None or len(seq.tokens) % ABORT_EVERY:
            return False
        return bool(abort(seq.data[skip:].decode("utf-8", "replace")))

    def _finish(self, seq: _Sequence, reason: FinishReason, end: int | None = None) -> None:
        """Release the slot and hand the caller its completion (cut at ``end``)."""
        self._release(seq, keep=True)
        data = seq.data[self._skip(seq) : end]
        seq.job.resolve(
            Completion(
                text=data.decode("utf-8", errors="ignore"),
                finish_reason=reason,
                prompt_tokens=len(seq.job.prompt),
                completion_tokens=len(seq.tokens),
            )
        )


class _Workers:
    """The engines serving one backend, and the routing of jobs to them."""

    def __init__(self, llm: Any, engines: int, threads: int, **options: Any) -> None:
        self.llm = llm
        self.engines: list[_BatchEngine] = []
        try:
            slots = options.pop("max_batch")
            for i in range(engines):
                # Split the slots as evenly as possible: 9 over 2 engines is 5 + 4.
                share = slots // engines + (1 if i < slots % engines else 0)
                self.engines.append(
                    _BatchEngine(llm, n_threads=threads, max_batch=share, **options)
                )
        except BaseException:
            self.close()
            raise

    def submit(self, job: _Job, prefer: int | None = None) -> int:
        """Queue ``job`` on engine ``prefer`` if it has a free slot (it holds the
        cells the prompt begins with), else on the least busy engine; return
        the engine's index."""
        engines = [e for e in self.engines if not e.closed]
        if not engines:
            raise _closed_error()
        engine = self.engines[prefer] if prefer is not None else None
        if engine is None or engine.closed or not engine.has_room():
            engine = min(engines, key=lambda e: e.load())
        engine.submit(job)
        return self.engines.index(engine)

    def close(self) -> None:
        """Stop every engine after its current decode; wait until they are gone.
        Jobs not finished fail with ``BackendError``.  Safe to call twice."""
        for engine in self.engines:
            engine.stop()  # all at once, then wait for each
        for engine in self.engines:
            engine.close()


def default_workers(n_threads: int) -> int:
    """How many engines share ``n_threads`` threads by default.

    Two single-thread engines beat one two-thread engine on a 2-core machine:
    llama.cpp's CPU threads meet at a spinning barrier after every operation,
    so one preempted thread stalls the other (a step then takes ~10x longer on
    a busy machine), while two engines never wait for each other.  Above two
    cores, two engines of ``n_threads // 2`` threads each.
    """
    return min(2, max(1, n_threads))
