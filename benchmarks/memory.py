"""Memory: peak RSS of the client at a small vs a large run, instant server.

Each run is a fresh child process (``--child``): ``agenerate(RunConfig(...))``
of N pairs to a temporary file against the instant server (benchmarks/common.py,
its own process, shared by all runs).  Peak RSS is the child's ``ru_maxrss``
(VmHWM); the child also samples its RSS 20 times during the run, so the table
shows whether memory grows with N (slope over the second half of the run).

magpie keeps nothing proportional to N in memory except the dedup index (by
design: MinHash signatures and LSH band keys, about 2 KB per record, see the
dedup benchmark).  So runs are made with dedup off and on, and a bare
``DedupIndex`` fed the same N instructions and saved (in a child) measures the
index's own share (``--no-index`` skips it).

Target (issue 5): peak RSS growth from the small to the large run <= 20 MB,
with the dedup index's share taken out (dedup off: the whole growth).  Exit 1
when missed.

    python benchmarks/memory.py                                # 1,000 vs 50,000, dedup off and on
    python benchmarks/memory.py --sizes 1000 100000 --dedup off  # ~4-5 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import instant_server, instruction_text, machine, table, verdict  # noqa: E402

LIMIT_MB = 20.0


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(url: str, pairs: int, dedup: bool, k: int) -> dict[str, Any]:
    from common import magpie_run

    curve: list[tuple[int, float, float]] = []
    every = max(1, pairs // 20)
    seen = 0
    t0 = time.perf_counter()

    def on_result(item: Any, stats: Any) -> None:
        nonlocal seen
        seen += 1
        if seen % every == 0:
            curve.append((stats.written, rss_mb(), time.perf_counter() - t0))

    import aiohttp  # noqa: F401 - imports done before "RSS before run"
    import httpx  # noqa: F401
    import ollama  # noqa: F401

    import magpie.commands.generate  # noqa: F401
    import magpie.settings  # noqa: F401

    if dedup:
        import magpie.pipeline.stages.dedup.index  # noqa: F401

    before = rss_mb()
    with tempfile.TemporaryDirectory(prefix="magpie-mem-") as tmp:
        m = asyncio.run(
            magpie_run(
                url,
                pairs,
                k,
                dedup=dedup,
                output=Path(tmp) / "out.jsonl",
                hooks={"on_result": on_result},
            )
        )
    return {
        "pairs": m.pairs,
        "seconds": m.seconds,
        "cpu": m.cpu,
        "rss_before": before,
        "rss_after": rss_mb(),
        "peak": peak_mb(),
        "curve": curve,
        "rejected": m.extra["rejected"],
    }


def index_child(pairs: int) -> dict[str, Any]:
    """A bare DedupIndex fed ``pairs`` instructions, then saved as a run saves it
    at its end: the index's own memory, including the save's transient copies."""
    from magpie.pipeline.stages.dedup.index import DedupIndex

    index = DedupIndex()
    index.check_and_add("warm-up", instruction_text(-1))
    before = rss_mb()
    t0 = time.perf_counter()
    for i in range(pairs):
        index.check_and_add(f"{i:016x}", instruction_text(i))
    with tempfile.TemporaryDirectory(prefix="magpie-mem-") as tmp:
        out = Path(tmp) / "out.jsonl"
        out.write_text("{}\n")
        index.save(out)  # as a run does at its end (<output>.dedup.npz)
    return {
        "pairs": pairs,
        "seconds": time.perf_counter() - t0,
        "rss_before": before,
        "rss_after": rss_mb(),
        "peak": peak_mb(),
    }


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope_kb_per_1k(curve: list[list[float]]) -> float:
    """RSS growth over the second half of a run, KB per 1,000 pairs."""
    half = [c for c in curve if c[0] >= curve[-1][0] / 2] if curve else []
    if len(half) < 2 or half[-1][0] == half[0][0]:
        return float("nan")
    return 1024 * (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[1000, 50000], metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--dedup", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--k", type=int, default=8, help="concurrency")
    parser.add_argument(
        "--no-index", action="store_true", help="skip measuring a bare DedupIndex on its own"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--on", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.url, args.pairs, args.on, args.k)))
        return 0
    if args.index_child:
        print(json.dumps(index_child(args.pairs)))
        return 0

    small, large = args.sizes
    print(f"Machine: {machine()}\n")
    print(
        "Server: instant asyncio server (benchmarks/common.py), its own process; "
        f"concurrency {args.k}; each run a fresh child process.\n"
    )
    rows = []
    checks = []
    growth: dict[str, float] = {}
    with instant_server() as srv:
        for mode in args.dedup:
            res = {}
            for n in (small, large):
                flag = ["--on"] if mode == "on" else []
                r = run_child(
                    "--child", "--url", srv.url, "--pairs", str(n), "--k", str(args.k), *flag
                )
                res[n] = r
                print(
                    f"  dedup {mode}, {n:,} pairs: peak {r['peak']:.1f} MB, "
                    f"{r['pairs'] / r['seconds']:.0f} pairs/s",
                    file=sys.stderr,
                )
                rows.append(
                    [
                        mode,
                        r["pairs"],
                        r["seconds"],
                        r["pairs"] / r["seconds"],
                        r["rss_before"],
                        r["peak"],
                        r["rss_after"],
                        slope_kb_per_1k(r["curve"]),
                    ]
                )
            growth[mode] = res[large]["peak"] - res[small]["peak"]
    index_growth = None
    if not args.no_index and "on" in args.dedup:
        ri = {n: run_child("--index-child", "--pairs", str(n)) for n in (small, large)}
        index_growth = ri[large]["peak"] - ri[small]["peak"]
        for n in (small, large):
            r = ri[n]
            rows.append(
                [
                    "DedupIndex alone",
                    r["pairs"],
                    r["seconds"],
                    r["pairs"] / r["seconds"],
                    r["rss_before"],
                    r["peak"],
                    r["rss_after"],
                    float("nan"),
                ]
            )
    print(
        table(
            [
                "dedup",
                "pairs",
                "seconds",
                "pairs/s",
                "RSS before run (imports done) MB",
                "peak RSS MB",
                "RSS after run MB",
                "RSS slope 2nd half KB/1k pairs",
            ],
            rows,
        )
    )
    print()
    growth_rows = []
    for mode, g in growth.items():
        growth_rows.append([mode, f"{small:,} -> {large:,}", g, 1024 * g / (large - small) * 1000])
    if index_growth is not None:
        growth_rows.append(
            [
                "DedupIndex alone",
                f"{small:,} -> {large:,}",
                index_growth,
                1024 * index_growth / (large - small) * 1000,
            ]
        )
    print(table(["dedup", "pairs", "peak RSS growth MB", "KB per 1k pairs"], growth_rows))
    scale = 100_000 / large if large < 100_000 else 1.0
    if "off" in growth:
        g = growth["off"]
        note = f" (x{scale:g} extrapolated to 100k: {g * scale:.1f} MB)" if scale != 1.0 else ""
        checks.append(
            (
                f"dedup off: peak RSS growth {g:.1f} MB <= {LIMIT_MB:g} MB{note}",
                g * scale <= LIMIT_MB,
            )
        )
    if "on" in growth:
        share = index_growth if index_growth is not None else None
        if share is None and "off" in growth:
            share = growth["on"] - growth["off"]
        if share is not None:
            rest = growth["on"] - share
            checks.append(
                (
                    f"dedup on: peak RSS growth {growth['on']:.1f} MB, of which the dedup index "
                    f"{share:.1f} MB ({1024 * share / (large - small):.2f} KB/record); "
                    f"the rest {rest:.1f} MB <= {LIMIT_MB:g} MB",
                    rest * scale <= LIMIT_MB,
                )
            )
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
