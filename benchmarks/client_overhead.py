"""Client overhead: magpie vs a bare asyncio loop, same server, same concurrency.

The server is the project's Ollama-protocol test server (tests/support/ollama_server.py,
in its own process) with a ScriptedEngine that sleeps ``--latency`` seconds per
request and ``slots = K`` parallel generations (like OLLAMA_NUM_PARALLEL=K).  A
pair is two requests (raw /api/generate, then /api/chat), so a client that adds
nothing reaches the ideal K / (2 * latency) pairs/s.

For each K, four clients take turns ``--rounds`` times (bare, magpie dedup on,
magpie dedup off, magpie dedup on with ``ollama.AsyncClient`` for the two
requests, in rotating order), each on the same server process:

* bare: K asyncio workers on one ``ollama.AsyncClient``, streaming, the same two
  requests per pair with the options magpie sends (benchmarks/common.py);
* magpie: ``magpie.commands.generate.agenerate(RunConfig(concurrency=K, ...))`` writing to
  a temporary file: pipeline, dedup, writer, manifest; its time is the whole
  call (backend probe, template, manifest and dedup cache included).  By
  default the two requests of a pair go as NDJSON over aiohttp (magpie's
  direct path); "magpie-official" sends them through ``ollama.AsyncClient``
  (httpx's default transport) instead.

Targets (issue 5): magpie pairs/s >= 0.97 x bare (median of the rounds), and
magpie pairs/s >= 0.95 x K / (2 * latency).  Exit 1 when one is missed.

    python benchmarks/client_overhead.py                     # latency 0.1 s, K = 4 8 16
    python benchmarks/client_overhead.py --latency 0.05 --k 8 --seconds 6 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Measure,
    bare_loop,
    machine,
    magpie_run,
    scripted_server,
    table,
    verdict,
)

CLIENTS = ("bare", "magpie", "magpie-nodedup", "magpie-official")


async def one(client: str, url: str, pairs: int, k: int, srv: object, seed: int) -> Measure:
    if client == "bare":
        return await bare_loop(url, pairs, k, seed=seed, server=srv)  # type: ignore[arg-type]
    return await magpie_run(
        url,
        pairs,
        k,
        dedup=client != "magpie-nodedup",
        seed=seed,
        server=srv,  # type: ignore[arg-type]
        official_client=client == "magpie-official",
    )


async def bench_k(
    latency: float, k: int, seconds: float, rounds: int, tuned: bool = True
) -> dict[str, list[Measure]]:
    ideal = k / (2 * latency)
    pairs = max(4 * k, round(ideal * seconds))
    out: dict[str, list[Measure]] = {c: [] for c in CLIENTS}
    with scripted_server(latency, k, tuned=tuned) as srv:
        # Warm-up, not counted: connections, imports (numpy for dedup), caches.
        await bare_loop(srv.url, k, k, seed=999, server=srv)
        await magpie_run(srv.url, k, k, seed=998, server=srv)
        for r in range(rounds):
            order = CLIENTS[r % len(CLIENTS) :] + CLIENTS[: r % len(CLIENTS)]
            for client in order:
                m = await one(client, srv.url, pairs, k, srv, seed=100 * r + len(client))
                out[client].append(m)
                print(
                    f"  K={k} round {r + 1}: {client:15s} {m.pairs_per_s:8.2f} pairs/s "
                    f"({m.pairs} pairs in {m.seconds:.2f} s, client CPU {m.cpu_ms_per_pair:.2f} "
                    f"ms/pair)",
                    file=sys.stderr,
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="concurrency = slots")
    parser.add_argument("--seconds", type=float, default=8.0, help="ideal seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each client per K")
    parser.add_argument(
        "--untuned-server",
        action="store_true",
        help="the test server with the stdlib's socket settings: Nagle on, listen backlog 5",
    )
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}\n")
    print(
        f"Server: tests/support/ollama_server.py ScriptedEngine, latency {args.latency:g} s per request, "
        "slots = K, one NDJSON line per word; its own process"
        + (
            " (untuned: Nagle on, backlog 5)"
            if args.untuned_server
            else " (TCP_NODELAY, backlog 1024)"
        )
        + ".\n"
    )
    rows = []
    checks = []
    for k in args.k:
        res = asyncio.run(
            bench_k(args.latency, k, args.seconds, args.rounds, tuned=not args.untuned_server)
        )
        ideal = k / (2 * args.latency)
        med = {c: statistics.median(m.pairs_per_s for m in ms) for c, ms in res.items()}
        for client in CLIENTS:
            ms = res[client]
            label = ms[0].label
            rows.append(
                [
                    k,
                    label,
                    ms[0].pairs,
                    " / ".join(f"{m.pairs_per_s:.2f}" for m in ms),
                    med[client],
                    med[client] / med["bare"],
                    med[client] / ideal,
                    statistics.median(m.cpu_ms_per_pair for m in ms),
                ]
            )
        checks.append(
            (
                f"K={k}: magpie (dedup on) / bare = {med['magpie'] / med['bare']:.3f} >= 0.97",
                med["magpie"] / med["bare"] >= 0.97,
            )
        )
        checks.append(
            (
                f"K={k}: magpie (dedup on) {med['magpie']:.2f} pairs/s >= 0.95 x K/(2 x latency) "
                f"= {0.95 * ideal:.2f} (ratio {med['magpie'] / ideal:.3f})",
                med["magpie"] / ideal >= 0.95,
            )
        )
    print(
        table(
            [
                "K",
                "client",
                "pairs per run",
                "pairs/s per round",
                "median pairs/s",
                "vs bare",
                "vs ideal K/(2L)",
                "client CPU ms/pair",
            ],
            rows,
        )
    )
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
