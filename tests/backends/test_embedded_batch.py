"""The batched embedded backend, through the real Backend contract.

One model (SmolLM2-135M-Instruct) serves the whole module; generations are kept
short.  The central property is determinism: a request's text depends only on
its prompt, sampling settings and seed, never on what else shares the batch,
and equals what the unbatched :class:`EmbeddedBackend` returns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from magpie.backends.base import Completion, Sampling
from magpie.backends.llamacpp.batch import BatchedEmbeddedBackend, common_prefix, render_chat
from magpie.backends.llamacpp.model import EmbeddedBackend
from magpie.errors import BackendError, ContextOverflow
from magpie.pipeline.scheduler import Pipeline, PipelineSettings
from magpie.records import Record
from magpie.templates import PreQuery, resolve_pre_query

#: Slow tier (tests/support/tiers.py): loads a model, trains or drives a browser.
pytestmark = pytest.mark.slow

SAMPLED = Sampling(temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=24)
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=24)
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain recursion to a child.",
    "List three uses of baking soda.",
]


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Iterator[BatchedEmbeddedBackend]:
    # Two engines of two slots each: jobs move between engines and slots.
    b = BatchedEmbeddedBackend(smollm2_path, n_ctx=1024, n_threads=2, max_batch=4, workers=2)
    assert b.workers == 2
    yield b
    asyncio.run(b.aclose())


@pytest.fixture(scope="module")
def pre_query(backend: BatchedEmbeddedBackend) -> PreQuery:
    return resolve_pre_query("auto", asyncio.run(backend.describe()))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def test_describe_matches_embedded(backend: BatchedEmbeddedBackend, smollm2_path: Path) -> None:
    async def both() -> tuple[Any, Any]:
        plain = EmbeddedBackend(smollm2_path, n_ctx=1024)
        try:
            return await backend.describe(), await plain.describe()
        finally:
            await plain.aclose()

    mine, theirs = run(both())
    assert mine == theirs
    assert backend.name == "embedded"
    assert mine.template_kind == "jinja"


def test_concurrent_requests_equal_one_at_a_time(
    backend: BatchedEmbeddedBackend, pre_query: PreQuery
) -> None:
    """Six sampled instructions and four chats in flight at once (more than
    max_batch, so slots are reused and prompts of different lengths join a
    running batch) give the same completions as the same requests run alone."""

    def requests() -> list[Any]:
        raw = [
            backend.complete(pre_query.text, sampling=SAMPLED, stop=pre_query.stop, seed=seed)
            for seed in range(6)
        ]
        chats = [
            backend.chat([{"role": "user", "content": q}], sampling=SAMPLED, seed=40 + i)
            for i, q in enumerate(QUESTIONS)
        ]
        return raw + chats

    async def together() -> list[Completion]:
        return list(await asyncio.gather(*requests()))

    async def alone() -> list[Completion]:
        return [await r for r in requests()]

    batched, single = run(together()), run(alone())
    assert batched == single
    assert len({c.text for c in batched[:6]}) == 6, "different seeds, different instructions"
    assert all(c.completion_tokens and c.completion_tokens > 0 for c in batched)


def test_without_flash_attention_still_batch_invariant(
    smollm2_path: Path, pre_query: PreQuery
) -> None:
    """flash_attn=False: prompts are evaluated alone in fixed passes, so the
    texts still do not depend on what else runs."""
    short = SAMPLED.model_copy(update={"max_tokens": 16})

    def requests(b: BatchedEmbeddedBackend) -> list[Any]:
        return [
            *[
                b.complete(pre_query.text, sampling=short, stop=pre_query.stop, seed=s)
                for s in range(3)
            ],
            *[
                b.chat([{"role": "user", "content": q}], sampling=short, seed=i)
                for i, q in enumerate(QUESTIONS[:3])
            ],
        ]

    async def both() -> tuple[list[Completion], list[Completion]]:
        b = BatchedEmbeddedBackend(smollm2_path, n_ctx=512, max_batch=4, flash_attn=False)
        try:
            together = list(await asyncio.gather(*requests(b)))
            alone = [await r for r in requests(b)]
            return together, alone
        finally:
            await b.aclose()

    together, alone = run(both())
    assert together == alone


def test_same_text_as_llama(
    backend: BatchedEmbeddedBackend, pre_query: PreQuery, smollm2_path: Path
) -> None:
    """Same request, same seed: the batched backend and EmbeddedBackend's code
    path (llama_cpp.Llama, one request at a time, flash attention on in both)
    return the same completion."""

    async def requests(b: Any, together: bool) -> list[Completion]:
        calls = [
            *[
                b.complete(pre_query.text, sampling=SAMPLED, stop=pre_query.stop, seed=s)
                for s in (11, 12, 13)
            ],
            b.chat([{"role": "user", "content": QUESTIONS[2]}], sampling=SAMPLED, seed=5),
        ]
        return list(await asyncio.gather(*calls)) if together else [await c for c in calls]

    async def compare() -> tuple[list[Completion], list[Completion]]:
        plain = EmbeddedBackend(smollm2_path, n_ctx=1024)
        try:
            return await requests(backend, True), await requests(plain, False)
        finally:
            await plain.aclose()

    mine, theirs = run(compare())
    assert mine == theirs


def test_min_p_same_text_as_llama_and_it_narrows(
    backend: BatchedEmbeddedBackend, pre_query: PreQuery, smollm2_path: Path
) -> None:
    """``min_p`` goes into the batched engine's sampler chain where
    llama_cpp.Llama puts it: the same text for the same seed, and at a high
    temperature it changes what is sampled."""
    hot = SAMPLED.model_copy(update={"temperature": 1.8})
    narrowed = hot.model_copy(update={"min_p": 0.2})

    async def texts(b: Any, sampling: Sampling) -> list[str]:
        out = []
        for s in (21, 22, 23):
            c = await b.complete(pre_query.text, sampling=sampling, stop=pre_query.stop, seed=s)
            out.append(c.text)
        return out

    async def compare() -> tuple[list[str], list[str], list[str]]:
        plain = EmbeddedBackend(smollm2_path, n_ctx=1024)
        try:
            return (
                await texts(backend, narrowed),
                await texts(plain, narrowed),
                await texts(backend, hot),
            )
        finally:
            await plain.aclose()

    mine, theirs, unnarrowed = run(compare())
    assert mine == theirs
    assert mine != unnarrowed


def test_chat_reuses_its_instruction_cells(
    backend: BatchedEmbeddedBackend, pre_query: PreQuery, smollm2_path: Path
) -> None:
    """The chat answering an instruction starts from the cells the instruction
    left (pre-query + generated tokens) instead of evaluating its prompt again,
    and still gets exactly what llama_cpp.Llama computes from scratch."""
    import llama_cpp

    async def pairs() -> list[tuple[int, Completion, Completion, int]]:
        out = []
        for seed in (21, 22):
            inst = await backend.complete(
                pre_query.text, sampling=SAMPLED, stop=pre_query.stop, seed=seed
            )
            before = backend.kv_stats().get("prompt_tokens_reused", 0)
            messages = [{"role": "user", "content": inst.text.strip()}]
            answer = await backend.chat(messages, sampling=SAMPLED, seed=seed)
            reused = backend.kv_stats()["prompt_tokens_reused"] - before
            out.append((seed, inst, answer, reused))
        return out

    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=1024, flash_attn=True, verbose=False)
    try:
        for seed, inst, answer, reused in run(pairs()):
            assert inst.text.strip()
            pre_len = len(llm.tokenize(pre_query.text.encode(), add_bos=False, special=True))
            assert reused > pre_len, "the instruction's own tokens were reused"
            ref = llm.create_chat_completion(
                [{"role": "user", "content": inst.text.strip()}],
                max_tokens=SAMPLED.max_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                seed=seed,
            )
            assert answer.text == ref["choices"][0]["message"]["content"]
            assert answer.completion_tokens == ref["usage"]["completion_tokens"]
    finally:
        llm.close()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_logits_batch_invariant(smollm2_path: Path, flash_attn: bool) -> None:
    """The evidence behind determinism: with one KV stream per sequence (the
    backend's setting) a sequence's logits are bit-identical whether it is
    decoded alone or in a batch with three other sequences."""
    import llama_cpp as L

    llm = L.Llama(str(smollm2_path), n_ctx=64, verbose=False)
    model, vocab = llm._model.model, llm._model.vocab
    n_vocab = L.llama_vocab_n_tokens(vocab)
    prompts = [
        llm.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n".encode(), special=True) for q in QUESTIONS
    ]

    def logits(n_seq: int) -> list[np.ndarray]:
        """Prefill every prompt, then 8 greedy steps; logits of sequence 0."""
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 256 * n_seq, n_seq, False
        params.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = L.llama_init_from_model(model, params)
        batch = L.llama_batch_init(256, 0, 1)
        out: list[np.ndarray] = []
        cur = {s: list(prompts[s]) for s in range(n_seq)}
        pos = dict.fromkeys(range(n_seq), 0)
        try:
            for _ in range(9):
                n, rows = 0, {}
                for s, toks in cur.items():
                    for k, t in enumerate(toks):
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, pos[s] + k, 1
                        batch.seq_id[n][0], batch.logits[n] = s, k == len(toks) - 1
                        n += 1
                    rows[s] = n - 1
                    pos[s] += len(toks)
                batch.n_tokens = n
                assert L.llama_decode(ctx, batch) == 0
                for s, row in rows.items():
                    lg = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
                    if s == 0:
                        out.append(lg.copy())
                    cur[s] = [int(np.argmax(lg))]
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        return out

    alone, batched = logits(1), logits(4)
    assert len(alone) == len(batched) == 9
    for a, b in zip(alone, batched, strict=True):
        assert np.array_equal(a, b)
    llm.close()


def test_stop_string_cuts_text(backend: BatchedEmbeddedBackend) -> None:
    prompt = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"
    full = run(backend.complete(prompt, sampling=GREEDY, stop=[], seed=1))
    assert len(full.text) > 20
    stop = full.text[12:16]
    cut = run(backend.complete(prompt, sampling=GREEDY, stop=["\x00never", stop], seed=1))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.completion_tokens is not None and cut.completion_tokens is not None
    assert cut.completion_tokens < full.completion_tokens


def test_max_tokens_is_length_and_token_counts(backend: BatchedEmbeddedBackend) -> None:
    prompt = (
        "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
    )
    out = run(
        backend.complete(prompt, sampling=GREEDY.model_copy(update={"max_tokens": 5}), stop=[])
    )
    assert out.finish_reason == "length"
    assert out.completion_tokens == 5
    assert out.prompt_tokens == len(
        backend.llm.tokenize(prompt.encode(), add_bos=False, special=True)
    )
    assert out.text


def test_eos_is_stop(backend: BatchedEmbeddedBackend) -> None:
    out = run(
        backend.chat(
            [{"role": "user", "content": "Say just the word yes."}],
            sampling=GREEDY.model_copy(update={"max_tokens": 64}),
        )
    )
    assert out.finish_reason == "stop"
    assert 0 < out.completion_tokens < 64  # type: ignore[operator]
    assert "<|im_end|>" not in out.text


def test_abort_stops_generation(backend: BatchedEmbeddedBackend) -> None:
    seen: list[str] = []

    def abort(text: str) -> bool:
        seen.append(text)
        return len(seen) == 2

    out = run(
        backend.chat(
            [{"role": "user", "content": "Write a long story about a dragon."}],
            sampling=GREEDY.model_copy(update={"max_tokens": 200}),
            abort=abort,
        )
    )
    assert out.finish_reason == "abort"
    assert out.completion_tokens == 16, "checked every 8 tokens, stopped at the second check"
    assert out.text == seen[-1]
    assert seen[0] and out.text.startswith(seen[0])


def test_failing_abort_check_fails_only_its_request(backend: BatchedEmbeddedBackend) -> None:
    def broken(text: str) -> bool:
        raise ValueError("broken check")

    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    sampling = GREEDY.model_copy(update={"max_tokens": 30})

    async def go() -> list[Any]:
        return list(
            await asyncio.gather(
                backend.chat(messages, sampling=sampling, abort=broken),
                backend.chat(messages, sampling=sampling),
                return_exceptions=True,
            )
        )

    failed, fine = run(go())
    assert isinstance(failed, ValueError)
    assert isinstance(fine, Completion) and fine.completion_tokens == 30
    # The worker is still serving.
    assert run(backend.chat(messages, sampling=sampling)) == fine


def test_greedy_chat_equals_llama_create_chat_completion(
    backend: BatchedEmbeddedBackend, smollm2_path: Path
) -> None:
    import llama_cpp

    # The backend has flash attention on; so must the reference.
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=1024, flash_attn=True, verbose=False)
    try:
        for q in QUESTIONS[:2]:
            messages = [{"role": "user", "content": q}]
            ref = llm.create_chat_completion(
                messages, max_tokens=40, temperature=0.0, repeat_penalty=1.0
            )
            out = run(backend.chat(messages, sampling=GREEDY.model_copy(update={"max_tokens": 40})))
            assert out.text == ref["choices"][0]["message"]["content"]
            assert out.finish_reason == ref["choices"][0]["finish_reason"]
            assert out.prompt_tokens == ref["usage"]["prompt_tokens"]
            assert out.completion_tokens == ref["usage"]["completion_tokens"]
    finally:
        llm.close()


def test_chat_prompt_has_default_system_block(backend: BatchedEmbeddedBackend) -> None:
    """SmolLM2's template inserts its default system prompt; the rendered prompt
    shares the pre-query's leading tokens (so the shared prefix is reused)."""
    llm = backend.llm
    rendered = render_chat(llm, [{"role": "user", "content": "Hi"}])
    text = llm.detokenize(rendered.tokens, special=True).decode()
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.stop == ["<|im_end|>"]
    pre = llm.tokenize(b"<|im_start|>system\nYou are a helpful", add_bos=False, special=True)
    assert common_prefix(rendered.tokens, pre) == len(pre)


def test_json_schema_chat_matches_embedded(
    backend: BatchedEmbeddedBackend, smollm2_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer"}},
        "required": ["score"],
    }
    messages = [{"role": "user", "content": "Rate the sky from 1 to 5 as JSON."}]
    sampling = GREEDY.model_copy(update={"max_tokens": 32})

    async def plain() -> Completion:
        import llama_cpp

        b = EmbeddedBackend(smollm2_path, n_ctx=1024)
        b._llm = llama_cpp.Llama(str(smollm2_path), n_ctx=1024, flash_attn=True, verbose=False)
        try:
            return await b.chat(messages, sampling=sampling, json_schema=schema)
        finally:
            await b.aclose()

    out = run(backend.chat(messages, sampling=sampling, json_schema=schema))
    assert out == run(plain())
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text)["score"], int)
    else:
        assert out.text.lstrip().startswith("{")


def test_context_overflow_is_refused_and_the_end_of_the_context_is_length(
    smollm2_path: Path,
) -> None:
    """A prompt that leaves no room in the context is refused (ContextOverflow,
    with the counts: the pipeline's context_overflow), never answered as an
    empty "length"; a prompt that fits generates until the end of the context,
    finish reason "length"."""

    async def go() -> tuple[ContextOverflow, Completion, ContextOverflow, int]:
        b = BatchedEmbeddedBackend(smollm2_path, n_ctx=256, max_batch=2)
        plain = EmbeddedBackend(smollm2_path, n_ctx=256)
        try:
            with pytest.raises(ContextOverflow) as huge:
                await b.complete("word " * 400, sampling=GREEDY, stop=[])
            near = await b.complete(
                "word " * 230, sampling=GREEDY.model_copy(update={"max_tokens": 100}), stop=[]
            )
            with pytest.raises(ContextOverflow) as unbatched:
                await plain.complete("word " * 400, sampling=GREEDY, stop=[])
            assert b._workers is not None
            return huge.value, near, unbatched.value, b._workers.engines[0].n_ctx_seq
        finally:
            await b.aclose()
            await plain.aclose()

    huge, near, unbatched, n_ctx_seq = run(go())
    assert huge.prompt_tokens is not None and huge.prompt_tokens >= n_ctx_seq
    assert huge.context == n_ctx_seq and not huge.retryable
    assert "--num-ctx" in str(huge) and f"({n_ctx_seq} tokens)" in str(huge)
    assert unbatched.prompt_tokens == huge.prompt_tokens and unbatched.context == 256
    assert near.finish_reason == "length"
    assert near.prompt_tokens + near.completion_tokens == n_ctx_seq  # type: ignore[operator]


def test_cancelled_request_frees_its_slot(backend: BatchedEmbeddedBackend) -> None:
    long = GREEDY.model_copy(update={"max_tokens": 400})
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]

    async def go() -> Completion:
        tasks = [asyncio.ensure_future(backend.chat(messages, sampling=long)) for _ in range(4)]
        await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # All four slots were taken; a new request still gets one at once.
        return await asyncio.wait_for(
            backend.chat(messages, sampling=GREEDY.model_copy(update={"max_tokens": 4})), 60
        )

    out = run(go())
    assert out.completion_tokens == 4


def test_aclose_while_requests_run(smollm2_path: Path) -> None:
    async def go() -> list[Any]:
        b = BatchedEmbeddedBackend(smollm2_path, n_ctx=1024, max_batch=2)
        long = GREEDY.model_copy(update={"max_tokens": 500})
        messages = [{"role": "user", "content": "Write a long story about a dragon."}]
        # Two running, two still queued.
        tasks = [asyncio.ensure_future(b.chat(messages, sampling=long, seed=i)) for i in range(4)]
        while b._workers is None or not any(e._active for e in b._workers.engines):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await asyncio.wait_for(b.aclose(), 60)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        with pytest.raises(BackendError):
            await b.complete("hello", sampling=GREEDY, stop=[])
        await b.aclose()  # twice is fine
        return results

    results = run(go())
    assert len(results) == 4
    for r in results:
        assert isinstance(r, BackendError) and r.cause == "closed", r


def test_pipeline_concurrency_4(backend: BatchedEmbeddedBackend, pre_query: PreQuery) -> None:
    """End to end: valid records, and the same records at concurrency 4 as at 1
    (what makes an interrupted-and-resumed run equal an uninterrupted one)."""
    short = Sampling(temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=32)

    async def generate(concurrency: int) -> list[Record]:
        settings = PipelineSettings(
            concurrency=concurrency,
            instruction=short,
            response=short.model_copy(update={"temperature": 0.0}),
            keep_truncated=True,
        )
        pipe = Pipeline(backend, pre_query, seed=1234, settings=settings)
        return [r async for r in pipe.run(4) if isinstance(r, Record)]

    four, one = run(generate(4)), run(generate(1))
    assert len(four) == 4
    for rec in four:
        assert rec.backend == "embedded" and rec.model == backend.model
        assert rec.instruction and rec.response
        assert [m.role for m in rec.messages] == ["user", "assistant"]
        assert rec.response_generation.completion_tokens
    key = [(r.index, r.instruction, r.response) for r in four]
    assert key == [(r.index, r.instruction, r.response) for r in one]
