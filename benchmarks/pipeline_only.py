"""Pipeline-only: magpie against an instant Ollama-protocol server.

The server (benchmarks/common.py ``instant-server``, its own process) answers
every request at once, so the client's own cost is all that limits the rate.
Each run is timed in this process, and its CPU time (user + system, all
threads: ``getrusage``) is measured apart from the server's (``/proc/PID/stat``).

Four clients, one after the other, on one server process:

* bare: the bare asyncio loop of ``ollama.AsyncClient`` (what any client built on
  the official library pays: httpx, httpcore, anyio, h11, pydantic parsing);
* magpie with dedup (the default) and without: ``agenerate(RunConfig(...))`` to a
  temporary file (pipeline, dedup, JSONL writer, manifest);
* magpie (dedup on) with ``OllamaBackend(direct_stream=False)``: /api/generate
  and /api/chat through ``ollama.AsyncClient`` on httpx's default transport
  instead of magpie's direct NDJSON path over aiohttp (the default);
* the same ``agenerate`` on an in-memory backend (no HTTP at all; the server's
  model description and template): magpie's own cost per pair.

Target (issue 5): >= 1,000 pairs/s for magpie (dedup on, the default) on the
2-core development machine.  Exit 1 when missed.  ``--profile`` runs magpie once
more under cProfile and prints its CPU by package and the top functions.

    python benchmarks/pipeline_only.py                    # 10,000 pairs, K=8
    python benchmarks/pipeline_only.py --pairs 10000 --k 4 8 16 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Measure,
    bare_loop,
    instant_server,
    machine,
    magpie_run,
    table,
    verdict,
)

TARGET = 1000.0

_PACKAGES = (
    "magpie",
    "ollama",
    "aiohttp",
    "yarl",
    "multidict",
    "httpx",
    "httpcore",
    "anyio",
    "h11",
    "sniffio",
    "pydantic",
    "pydantic_core",
    "numpy",
    "asyncio",
    "json",
)


def package_of(filename: str) -> str:
    """The top-level package a profiled function belongs to."""
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C calls)"
    parts = Path(filename).parts
    for pkg in _PACKAGES:
        if pkg in parts:
            # the innermost match: site-packages/pydantic_core vs .../asyncio
            idx = max(i for i, p in enumerate(parts) if p in _PACKAGES)
            return parts[idx]
    return "other (stdlib: selectors, socket, contextlib, ...)"


def profile_report(prof: cProfile.Profile, pairs: int, top: int) -> None:
    stats = pstats.Stats(prof)
    by_pkg: collections.Counter[str] = collections.Counter()
    rows = []
    total = 0.0
    for (filename, line, name), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        by_pkg[package_of(filename)] += tt
        total += tt
        rows.append((tt, nc, f"{package_of(filename)}: {Path(filename).name}:{line} {name}"))
    print("\ncProfile (CPU time) of one more magpie run (dedup on): self time by package.")
    print(
        "cProfile adds a cost to every Python call (several times the run's real CPU time), "
        "so read shares, not absolute times.\n"
    )
    print(
        table(
            ["package", "share of self time"],
            [
                [pkg, f"{100 * tt / total:.1f}%"]
                for pkg, tt in by_pkg.most_common()
                if tt / total >= 0.005
            ],
        )
    )
    print(f"\nTop {top} functions by self time\n")
    rows.sort(reverse=True)
    print(
        table(
            ["share", "calls per pair", "function"],
            [[f"{100 * tt / total:.1f}%", nc / pairs, fn] for tt, nc, fn in rows[:top]],
        )
    )


async def bench(
    args: argparse.Namespace,
) -> tuple[list[list[object]], list[tuple[str, bool]], tuple[cProfile.Profile, int] | None]:
    rows: list[list[object]] = []
    profiled = None
    checks: list[tuple[str, bool]] = []
    with instant_server(args.chunks) as srv:
        for k in args.k:
            # Warm-up, not counted: connections, imports (numpy), caches.
            await bare_loop(srv.url, 200, k, server=srv)
            await magpie_run(srv.url, 200, k, server=srv)
            runs: list[Measure] = []
            variants: list[tuple[str, bool]] = [
                ("bare", False),
                ("magpie", True),
                ("magpie", False),
                ("official", True),
                ("null", True),
                ("null", False),
            ]
            for kind, dedup in variants:
                if kind == "bare":
                    m = await bare_loop(srv.url, args.pairs, k, server=srv)
                else:
                    m = await magpie_run(
                        srv.url,
                        args.pairs,
                        k,
                        dedup=dedup,
                        server=srv,
                        null_backend=kind == "null",
                        official_client=kind == "official",
                    )
                runs.append(m)
                print(
                    f"  K={k} {m.label}: {m.pairs_per_s:.0f} pairs/s, "
                    f"{m.cpu_ms_per_pair:.3f} ms CPU/pair",
                    file=sys.stderr,
                )
            bare = runs[0]
            for m in runs:
                rows.append(
                    [
                        k,
                        m.label,
                        m.pairs,
                        m.seconds,
                        m.pairs_per_s,
                        m.cpu,
                        m.cpu_ms_per_pair,
                        m.cpu_ms_per_pair - bare.cpu_ms_per_pair,
                        f"{100 * m.cpu / m.seconds:.0f}%",
                        1000 * m.server_cpu / max(1, m.pairs),
                    ]
                )
            magpie = runs[1]
            checks.append(
                (
                    f"K={k}: magpie (dedup on) {magpie.pairs_per_s:,.0f} pairs/s >= {TARGET:,.0f} "
                    f"(bare ollama.AsyncClient loop: {bare.pairs_per_s:,.0f} pairs/s)",
                    magpie.pairs_per_s >= TARGET,
                )
            )
        if args.profile:
            prof = cProfile.Profile(time.process_time)  # CPU time, not wall time
            prof.enable()
            m = await magpie_run(srv.url, args.profile_pairs, args.k[0], server=srv)
            prof.disable()
            profiled = (prof, m.pairs)
    return rows, checks, profiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--k", type=int, nargs="+", default=[8], help="concurrency")
    parser.add_argument(
        "--chunks",
        choices=("one", "words"),
        default="one",
        help="one content line per reply (default) or one per word, like Ollama's per token",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one more magpie run")
    parser.add_argument("--profile-pairs", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}\n")
    print(
        f"Server: instant asyncio server (benchmarks/common.py), its own process, "
        f"{'one content line' if args.chunks == 'one' else 'one line per word'} "
        "plus the final line per reply.\n"
    )
    rows, checks, profiled = asyncio.run(bench(args))
    print()
    print(
        table(
            [
                "K",
                "client",
                "pairs",
                "seconds",
                "pairs/s",
                "client CPU s",
                "client CPU ms/pair",
                "ms/pair over bare",
                "client CPU use",
                "server CPU ms/pair",
            ],
            rows,
        )
    )
    if profiled is not None:
        profile_report(*profiled, args.top)
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
