"""Embedded throughput: magpie's batched embedded backend vs a plain sequential loop.

(a) The plain loop of issue 5: ``llama_cpp.Llama(model, n_ctx=2048)`` with its
    default threads; per pair one ``create_completion`` of the pre-query, then
    one ``create_chat_completion`` of the instruction, 128 max tokens each,
    temperature 1.0 (top_p 1.0 for the instruction).
(b) magpie's :class:`~magpie.pipeline.scheduler.Pipeline` on
    :class:`~magpie.backends.llamacpp.batch.BatchedEmbeddedBackend` (``max_batch
    = K``, pipeline concurrency K), same model, same sampling (both stages
    temperature 1.0, top_p 1.0, 128 max tokens), for each K asked for.

Both run in this one process, one after the other (never two models at once),
so their ratio holds even on a busy machine.  Model loading is not timed; each
side is warmed up with a one-token request first.  Prints a Markdown table.

    python benchmarks/embedded_throughput.py --pairs 24 --k 4 8 12
    python benchmarks/embedded_throughput.py --check-invariance
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magpie.backends.base import Sampling
from magpie.backends.llamacpp.batch import BatchedEmbeddedBackend
from magpie.backends.llamacpp.buildcheck import check_build
from magpie.backends.llamacpp.model import default_model_path
from magpie.pipeline.scheduler import Pipeline, PipelineSettings
from magpie.records import Record
from magpie.templates import resolve_pre_query

MAX_TOKENS = 128


@dataclass
class Result:
    """One measured configuration."""

    label: str
    pairs: int
    attempts: int
    seconds: float
    completion_tokens: int
    #: CPU time of the process (all threads) during the run.
    cpu_seconds: float
    notes: str = ""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def pairs_per_cpu_s(self) -> float:
        return self.pairs / self.cpu_seconds


def cpu_time() -> float:
    """CPU seconds used by this process so far (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def plain_loop(model: Path, pre_query: str, pairs: int) -> Result:
    """(a) The sequential loop, exactly as issue 5 defines it (``pairs`` pairs)."""
    import llama_cpp

    check_build(model)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=2048, verbose=False)
    llm.create_completion(pre_query, max_tokens=1)  # warm-up, not timed
    tokens = 0
    start, cpu = time.perf_counter(), cpu_time()
    for _ in range(pairs):
        inst = llm.create_completion(pre_query, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0)
        instruction = inst["choices"][0]["text"]
        resp = llm.create_chat_completion(
            [{"role": "user", "content": instruction}], max_tokens=MAX_TOKENS, temperature=1.0
        )
        tokens += inst["usage"]["completion_tokens"] + resp["usage"]["completion_tokens"]
    seconds, cpu = time.perf_counter() - start, cpu_time() - cpu
    llm.close()
    return Result("plain loop (Llama, default threads)", pairs, pairs, seconds, tokens, cpu)


async def magpie_pipeline(
    model: Path, pairs: int, k: int, seed: int, top_k: int, options: dict[str, Any]
) -> Result:
    """(b) magpie's pipeline on the batched backend, K pairs in flight."""
    backend = BatchedEmbeddedBackend(model, max_batch=k, **options)
    try:
        pre_query = resolve_pre_query("auto", await backend.describe())
        sampling = Sampling(
            temperature=1.0, top_p=1.0, top_k=top_k, repeat_penalty=1.0, max_tokens=MAX_TOKENS
        )
        await backend.complete(  # warm-up (starts the worker), not timed
            pre_query.text, sampling=sampling.model_copy(update={"max_tokens": 1}), stop=[]
        )
        settings = PipelineSettings(
            concurrency=k,
            instruction=sampling,
            response=sampling,
            keep_truncated=True,
            stop_repetition=False,
        )
        pipe = Pipeline(backend, pre_query, seed=seed, settings=settings)
        start, cpu = time.perf_counter(), cpu_time()
        records = [r async for r in pipe.run(pairs) if isinstance(r, Record)]
        seconds, cpu = time.perf_counter() - start, cpu_time() - cpu
        kv = backend.kv_stats()
    finally:
        await backend.aclose()
    rejected = ", ".join(f"{n} {r}" for r, n in pipe.stats.rejected.most_common())
    return Result(
        f"magpie, batched backend, K={k}",
        len(records),
        pipe.stats.attempts,
        seconds,
        pipe.stats.completion_tokens,
        cpu,
        f"rejected: {rejected or 'none'}; prompt tokens reused {kv.get('prompt_tokens_reused', 0)}"
        f", copied {kv.get('prompt_tokens_copied', 0)}; "
        f"{kv.get('tokens_decoded', 0) / max(1, kv.get('decode_calls', 0)):.1f} tokens per decode",
    )


def check_invariance(model: Path) -> None:
    """Logits of one sequence decoded alone vs beside three others (KV layouts)."""
    import llama_cpp as L
    import numpy as np

    check_build(model)
    llm = L.Llama(model_path=str(model), n_ctx=64, verbose=False)
    vocab = llm._model.vocab
    n_vocab = L.llama_vocab_n_tokens(vocab)
    questions = ["Write a haiku about the sea.", "What is 2+2?", "Explain photosynthesis.", "Hi"]
    prompts = [
        llm.tokenize(
            f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True
        )
        for q in questions
    ]

    def run(
        n_seq: int, unified: bool, flash: bool, forced: list[int] | None, staggered: bool = False
    ) -> tuple[Any, Any]:
        """Prefill the prompts, then 24 decode steps; sequence 0 follows
        ``forced`` (the tokens it picked alone) so that its logits compare step
        by step, the others decode greedily.  ``staggered``: as in continuous
        batching, sequences 1-3 join at steps 3, 7 and 11 and sequence 1 leaves
        (its cells freed) at step 15.  Returns sequence 0's logits and picks."""
        join = {1: 3, 2: 7, 3: 11} if staggered else {}
        mem_rm = L.llama_memory_seq_rm
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 512 * n_seq, n_seq, unified
        params.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = L.llama_init_from_model(llm._model.model, params)
        batch = L.llama_batch_init(512, 0, 1)
        feed = {s: list(prompts[s]) for s in range(n_seq) if s not in join}
        pos = dict.fromkeys(range(n_seq), 0)
        logits, picks = [], []
        for step in range(25):
            feed.update({s: list(prompts[s]) for s, at in join.items() if at == step})
            if staggered and step == 15:
                del feed[1]
                mem_rm(L.llama_get_memory(ctx), 1, -1, -1)
            n, rows = 0, {}
            for s, toks in feed.items():
                for j, t in enumerate(toks):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, pos[s] + j, 1
                    batch.seq_id[n][0], batch.logits[n] = s, j == len(toks) - 1
                    n += 1
                rows[s], pos[s] = n - 1, pos[s] + len(toks)
            batch.n_tokens = n
            assert L.llama_decode(ctx, batch) == 0
            for s, row in rows.items():
                lg = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
                pick = int(np.argmax(lg))
                if s == 0:
                    logits.append(lg.copy())
                    picks.append(pick)
                    pick = forced[step] if forced is not None else pick
                feed[s] = [pick]
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return logits, picks

    print(
        "| attention | KV cache | batch of 4 | steps with bit-identical logits "
        "| max abs logit diff | same greedy tokens |"
    )
    print("|---|---|---|---|---|---|")
    for flash in (False, True):
        alone, tokens = run(1, False, flash, None)
        for unified in (False, True):
            for staggered in (False, True):
                batched, picks = run(4, unified, flash, tokens, staggered)
                diffs = [float(np.max(np.abs(a - b))) for a, b in zip(alone, batched, strict=True)]
                same = sum(d == 0.0 for d in diffs)
                print(
                    f"| {'flash' if flash else 'default (no flash)'} "
                    f"| {'unified (one stream)' if unified else 'one stream per sequence'} "
                    f"| {'joining and leaving' if staggered else 'all from the start'} "
                    f"| {same}/{len(diffs)} | {max(diffs):.3g} | {picks == tokens} |"
                )
    # A prompt's cells computed in one pass vs one token at a time (as the
    # tokens of an instruction are, before its chat reuses them).
    text = (
        "<|im_start|>user\nTell me a story about a robot who learns to paint the sky.<|im_end|>\n"
    )
    tokens = llm.tokenize(text.encode(), special=True)
    print()
    print("| attention | logits after a prompt pass vs after one token at a time |")
    print("|---|---|")
    for flash in (False, True):
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 1024, 2, False
        params.flash_attn_type = (
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = L.llama_init_from_model(llm._model.model, params)
        batch = L.llama_batch_init(512, 0, 1)
        rows = {}
        for seq, chunks in ((0, [tokens]), (1, [[t] for t in tokens])):
            pos = 0
            for chunk in chunks:
                for j, t in enumerate(chunk):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = t, pos + j, 1
                    batch.seq_id[j][0], batch.logits[j] = seq, j == len(chunk) - 1
                batch.n_tokens, pos = len(chunk), pos + len(chunk)
                assert L.llama_decode(ctx, batch) == 0
            lg = L.llama_get_logits_ith(ctx, len(chunks[-1]) - 1)
            rows[seq] = np.ctypeslib.as_array(lg, shape=(n_vocab,)).copy()
        diff = float(np.max(np.abs(rows[0] - rows[1])))
        same = "bit-identical" if diff == 0 else f"differ (max abs diff {diff:.3g})"
        print(f"| {'flash' if flash else 'default (no flash)'} | {same} ({len(tokens)} tokens) |")
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    llm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=24, help="pairs per configuration")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 12], help="batch sizes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--top-k",
        type=int,
        default=40,
        help="magpie's top-k (default 40: what the plain loop gets from llama-cpp-python; "
        "magpie's own default is 0)",
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default SmolLM2)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context per sequence")
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    parser.add_argument("--workers", type=int, default=None, help="engines (default: auto)")
    parser.add_argument("--no-flash-attn", action="store_true", help="flash attention off")
    parser.add_argument("--no-share-prefix", action="store_true", help="no KV prefix copies")
    parser.add_argument(
        "--check-invariance", action="store_true", help="only compare logits alone vs batched"
    )
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    if args.check_invariance:
        check_invariance(model)
        return 0

    async def pre_query_text() -> str:
        b = BatchedEmbeddedBackend(model)
        try:
            return resolve_pre_query("auto", await b.describe()).text
        finally:
            await b.aclose()

    pre_query = asyncio.run(pre_query_text())
    options: dict[str, Any] = {
        "n_ctx": args.n_ctx,
        "n_threads": args.threads,
        "workers": args.workers,
        "flash_attn": not args.no_flash_attn,
        "share_prefix": not args.no_share_prefix,
    }
    print(f"# {model.name}, {args.pairs} pairs, {os.cpu_count()} CPUs ({cpu_name()})")
    print(f"# batched backend options: {options}")
    load_before = os.getloadavg()[0]
    # The plain loop runs in two halves, before and after magpie's runs, so that
    # a change in the machine's load during the benchmark hits both sides.
    print("running the plain loop (first half)...", file=sys.stderr)
    first = plain_loop(model, pre_query, args.pairs // 2)
    results = []
    for k in args.k:
        print(f"running magpie with K={k}...", file=sys.stderr)
        results.append(
            asyncio.run(magpie_pipeline(model, args.pairs, k, args.seed, args.top_k, options))
        )
    print("running the plain loop (second half)...", file=sys.stderr)
    second = plain_loop(model, pre_query, args.pairs - args.pairs // 2)
    base = Result(
        first.label,
        first.pairs + second.pairs,
        first.attempts + second.attempts,
        first.seconds + second.seconds,
        first.completion_tokens + second.completion_tokens,
        first.cpu_seconds + second.cpu_seconds,
    )
    print(f"# load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"# magpie sampling: temperature 1.0, top_p 1.0, top_k {args.top_k}")
    print(
        "| run | pairs | attempts | seconds | pairs/s | completion tokens/s "
        "| vs plain loop | pairs per CPU-second | vs plain loop (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in [base, *results]:
        print(
            f"| {r.label} | {r.pairs} | {r.attempts} | {r.seconds:.1f} | {r.pairs_per_s:.3f} "
            f"| {r.tokens_per_s:.1f} | **{r.pairs_per_s / base.pairs_per_s:.2f}x** "
            f"| {r.pairs_per_cpu_s:.3f} | {r.pairs_per_cpu_s / base.pairs_per_cpu_s:.2f}x |"
        )
    for r in results:
        print(f"- {r.label}: {r.notes}")
    best = max(results, key=lambda r: r.pairs_per_s)
    print(f"\nbest: {best.label}: {best.pairs_per_s / base.pairs_per_s:.2f}x the plain loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
