"""Throughput on the real servers: magpie against a bare client loop.

Part 1, the real Ollama (``../shared/servers``, or ``MAGPIE_OLLAMA``) serving
SmolLM2-135M-Instruct with the library template (``num_thread 1``), started with
``OLLAMA_NUM_PARALLEL`` P for each P of ``--parallel``.  Two clients take turns,
``--rounds`` times, on the same server and model, with the same N pairs, the same
requests and the same token limits:

* bare: P asyncio workers on one ``ollama.AsyncClient``; per pair the streamed raw
  ``/api/generate`` of the pre-query (magpie's exact pre-query, stop strings,
  options and per-request seed), then, when magpie's cleaning keeps the
  instruction, the streamed ``/api/chat`` of it: the work magpie does, nothing
  more;
* magpie: ``agenerate(RunConfig(concurrency=P, ...))`` writing a temporary file
  (dedup off, so both do the same requests).

Both report pairs/s and completion tokens/s of wall time.  The server's own
decode rate (its ``eval_count`` / ``eval_duration`` of each request, summed; the
rate P sequences reach together) is the physical limit; "of server" is the
client's tokens/s over it.  Targets (issue 10): magpie >= 0.97x the bare loop,
and within 10% of the server's own tokens/s at the same parallelism.

Part 2 (``--embedded``): magpie's embedded backend (our batch engine over
llama.cpp, ``--concurrency K``) against ``llama-server --parallel K`` driven by a
bare async client (httpx) on the same GGUF, sampling and token limits.

    python benchmarks/real_throughput.py                       # P = 1 2 4, 8 pairs, 2 rounds
    python benchmarks/real_throughput.py --parallel 2 --pairs 12 --rounds 3
    python benchmarks/real_throughput.py --embedded --k 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, verdict  # noqa: E402
from real_servers import (  # noqa: E402
    RealLlamaServer,
    RealOllama,
    llama_server_binary,
    ollama_binary,
    smollm2_gguf,
)

MODEL = "smollm2"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from magpie.backends.base import Sampling

    return {
        "instruction": Sampling(
            temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=args.inst_tokens
        ),
        "response": Sampling(
            temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=args.resp_tokens
        ),
        "keep_truncated": True,
        "dedup": False,
    }


class Tally:
    def __init__(self) -> None:
        self.pairs = 0
        self.tokens = 0
        self.eval_tokens = 0
        self.eval_seconds = 0.0

    def add(self, chunk: Any) -> None:
        self.tokens += chunk.eval_count or 0
        self.eval_tokens += chunk.eval_count or 0
        self.eval_seconds += (chunk.eval_duration or 0) / 1e9


async def bare_ollama(url: str, n: int, k: int, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The bare loop (see the module docstring); the same seeds as magpie."""
    import ollama

    from magpie.backends.base import Completion
    from magpie.commands.generate import prepare
    from magpie.pipeline.stages.clean import clean_instruction
    from magpie.records import derive_seed
    from magpie.settings import RunConfig

    prep = await prepare(RunConfig(backend="ollama", model=MODEL, host=url))
    await prep.backend.aclose()
    pq = prep.pre_query
    client = ollama.AsyncClient(host=url, timeout=600)
    tally = Tally()
    next_index = 0

    def opts(s: Any, sd: int, stop: list[str] | None) -> dict[str, Any]:
        o = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "num_predict": s.max_tokens,
            "top_k": s.top_k,
            "repeat_penalty": s.repeat_penalty,
            "seed": sd,
        }
        if stop:
            o["stop"] = stop
        return o

    async def worker() -> None:
        nonlocal next_index
        while tally.pairs < n:
            i = next_index
            next_index += 1
            text, last = "", None
            async for c in await client.generate(
                model=MODEL,
                prompt=pq.text,
                raw=True,
                stream=True,
                options=opts(cfg["instruction"], derive_seed(seed, i, "instruction"), pq.stop),
            ):
                text += c.response or ""
                last = c
            if last is not None and last.done:
                tally.add(last)
            reason = last.done_reason if last is not None and last.done else "repeat"
            comp = Completion(
                text=text, finish_reason=reason if reason in ("stop", "length") else "repeat"
            )
            inst, why = clean_instruction(comp, pq.forbidden)
            if why is not None or tally.pairs >= n:
                continue
            answer, last = "", None
            async for c in await client.chat(
                model=MODEL,
                messages=[{"role": "user", "content": inst}],
                stream=True,
                options=opts(cfg["response"], derive_seed(seed, i, "response"), None),
            ):
                answer += (c.message.content or "") if c.message else ""
                last = c
            if last is not None and last.done:
                tally.add(last)
            if answer.strip():
                tally.pairs += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(k)))
    seconds = time.perf_counter() - t0
    await client.close()
    return _row("bare ollama.AsyncClient loop", tally.pairs, tally.tokens, seconds, tally, k)


async def magpie_ollama(
    url: str,
    n: int,
    k: int,
    seed: int,
    cfg: dict[str, Any],
    backend: str = "ollama",
    model: str | None = MODEL,
) -> dict[str, Any]:
    from magpie.commands.generate import agenerate
    from magpie.settings import RunConfig

    with tempfile.TemporaryDirectory(prefix="magpie-bench-") as tmp:
        rc = RunConfig(
            num=n,
            output=f"{tmp}/out.jsonl",
            backend=backend,
            model=model,
            host=url,
            concurrency=k,
            seed=seed,
            quiet=True,
            **cfg,
        )
        t0 = time.perf_counter()
        result = await agenerate(rc)
        seconds = time.perf_counter() - t0
    st = result.stats
    return _row(f"magpie ({backend})", st.written, st.completion_tokens, seconds, None, k)


def _row(
    label: str, pairs: int, tokens: int, seconds: float, tally: Tally | None, k: int
) -> dict[str, Any]:
    server = None
    if tally is not None and tally.eval_seconds > 0:
        server = tally.eval_tokens / tally.eval_seconds * k  # k sequences decode together
    return {
        "label": label,
        "pairs": pairs,
        "tokens": tokens,
        "seconds": seconds,
        "pairs_s": pairs / seconds,
        "tok_s": tokens / seconds,
        "server_tok_s": server,
    }


def part_ollama(args: argparse.Namespace) -> list[tuple[str, bool]]:
    binary = ollama_binary()
    if binary is None:
        print("no Ollama binary: set MAGPIE_OLLAMA or put ../shared/servers beside the repository")
        return []
    cfg = settings(args)
    checks = []
    rows = []
    for p in args.parallel:
        work = Path(tempfile.mkdtemp(prefix="magpie-bench-ollama-"))
        srv = RealOllama(binary, work, num_parallel=p).start()
        try:
            srv.create_smollm2_models(smollm2_gguf())
            asyncio.run(bare_ollama(srv.url, 1, 1, 999, cfg))  # load the model
            bare, mine = [], []
            for r in range(args.rounds):
                order = ("bare", "magpie") if r % 2 == 0 else ("magpie", "bare")
                for who in order:
                    seed = 100 + r
                    if who == "bare":
                        bare.append(asyncio.run(bare_ollama(srv.url, args.pairs, p, seed, cfg)))
                    else:
                        mine.append(asyncio.run(magpie_ollama(srv.url, args.pairs, p, seed, cfg)))
            b = statistics.median(x["tok_s"] for x in bare)
            m = statistics.median(x["tok_s"] for x in mine)
            server = statistics.median(x["server_tok_s"] for x in bare)
            bp = statistics.median(x["pairs_s"] for x in bare)
            mp = statistics.median(x["pairs_s"] for x in mine)
            rows.append([p, args.pairs, bp, mp, mp / bp, b, m, m / b, server, m / server])
            checks.append((f"P={p}: magpie tokens/s >= 0.97 x bare ({m / b:.3f})", m / b >= 0.97))
            checks.append(
                (
                    f"P={p}: magpie >= 0.90 x server decode rate ({m / server:.3f})",
                    m / server >= 0.90,
                )
            )
        finally:
            srv.stop()
    print(
        table(
            [
                "OLLAMA_NUM_PARALLEL = K",
                "pairs",
                "bare pairs/s",
                "magpie pairs/s",
                "ratio",
                "bare tok/s",
                "magpie tok/s",
                "ratio",
                "server decode tok/s",
                "magpie / server",
            ],
            rows,
        )
    )
    return checks


async def bare_llama_server(
    url: str, n: int, k: int, seed: int, cfg: dict[str, Any], pq: Any
) -> dict[str, Any]:
    """K workers on one httpx client: /v1/completions of the pre-query, then
    /v1/chat/completions of the kept instruction, not streamed."""
    import httpx

    from magpie.backends.base import Completion
    from magpie.pipeline.stages.clean import clean_instruction
    from magpie.records import derive_seed

    tally = Tally()
    tokens = 0
    next_index = 0

    def fields(s: Any, sd: int) -> dict[str, Any]:
        return {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "repeat_penalty": s.repeat_penalty,
            "max_tokens": s.max_tokens,
            "seed": sd,
        }

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            nonlocal next_index, tokens
            while tally.pairs < n:
                i = next_index
                next_index += 1
                r = (
                    await client.post(
                        "/v1/completions",
                        json={
                            "prompt": pq.text,
                            "stop": pq.stop,
                            **fields(cfg["instruction"], derive_seed(seed, i, "instruction")),
                        },
                    )
                ).json()
                ch = r["choices"][0]
                tokens += r["usage"]["completion_tokens"]
                comp = Completion(
                    text=ch["text"],
                    finish_reason="length" if ch["finish_reason"] == "length" else "stop",
                )
                inst, why = clean_instruction(comp, pq.forbidden)
                if why is not None or tally.pairs >= n:
                    continue
                r = (
                    await client.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": inst}],
                            **fields(cfg["response"], derive_seed(seed, i, "response")),
                        },
                    )
                ).json()
                tokens += r["usage"]["completion_tokens"]
                if r["choices"][0]["message"]["content"].strip():
                    tally.pairs += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        seconds = time.perf_counter() - t0
    return _row(
        f"bare httpx loop on llama-server --parallel {k}", tally.pairs, tokens, seconds, None, k
    )


async def bare_on(url: str, n: int, k: int, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The bare loop with the pre-query magpie resolves on that server."""
    from magpie.backends.openai import OpenAIBackend
    from magpie.templates.rendered import aresolve_pre_query

    async with OpenAIBackend(None, url) as b:
        pq = await aresolve_pre_query("auto", b, await b.describe())
    return await bare_llama_server(url, n, k, seed, cfg, pq)


async def embedded_run(n: int, k: int, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    from magpie.commands.generate import agenerate
    from magpie.settings import RunConfig

    with tempfile.TemporaryDirectory(prefix="magpie-bench-") as tmp:
        rc = RunConfig(
            num=n,
            output=f"{tmp}/out.jsonl",
            backend="embedded",
            concurrency=k,
            seed=seed,
            quiet=True,
            **cfg,
        )
        t0 = time.perf_counter()
        result = await agenerate(rc)
        seconds = time.perf_counter() - t0
    st = result.stats
    return _row(
        f"magpie embedded, --concurrency {k}", st.written, st.completion_tokens, seconds, None, k
    )


def part_embedded(args: argparse.Namespace) -> list[tuple[str, bool]]:
    binary = llama_server_binary()
    cfg = settings(args)
    rows = []
    for k in args.k:
        runs: dict[str, list[dict[str, Any]]] = {"embedded": [], "server": []}
        for r in range(args.rounds):
            runs["embedded"].append(asyncio.run(embedded_run(args.pairs, k, 200 + r, cfg)))
            if binary is None:
                continue
            for threads in args.llama_threads:
                srv = RealLlamaServer(
                    binary,
                    smollm2_gguf(),
                    Path(tempfile.mkdtemp()),
                    parallel=k,
                    ctx=4096 * k,
                    extra_args=["-t", str(threads)],
                ).start()
                try:
                    row = asyncio.run(bare_on(srv.url, args.pairs, k, 200 + r, cfg))
                    row["label"] += f", -t {threads}"
                    runs.setdefault(f"server-t{threads}", []).append(row)
                finally:
                    srv.stop()
        for rs in runs.values():
            if rs:
                rows.append(
                    [
                        rs[0]["label"],
                        k,
                        statistics.median(x["pairs_s"] for x in rs),
                        statistics.median(x["tok_s"] for x in rs),
                    ]
                )
    print(table(["client", "K", "pairs/s", "tokens/s"], rows))
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--inst-tokens", type=int, default=64)
    ap.add_argument("--resp-tokens", type=int, default=128)
    ap.add_argument("--embedded", action="store_true", help="part 2 instead of part 1")
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--llama-threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(machine())
    print(
        f"{args.pairs} pairs a run, instruction <= {args.inst_tokens} tokens, response <= "
        f"{args.resp_tokens} tokens, {args.rounds} interleaved rounds, num_thread 1\n"
    )
    checks = part_embedded(args) if args.embedded else part_ollama(args)
    return verdict(checks) if checks else 0


if __name__ == "__main__":
    sys.exit(main())
