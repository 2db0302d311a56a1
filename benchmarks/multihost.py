"""Multi-host: two test servers, one stopped mid-run (and later restarted).

Two Ollama-protocol test servers (tests/support/ollama_server.py, ScriptedEngine with
``--latency`` seconds per request and ``--per-host`` slots each) run in this
process; magpie runs through its library API (``agenerate`` with both hosts,
``per_host`` requests in flight on each, concurrency 2 x per_host).  After
``--stop-after`` pairs, host A is stopped (its socket closed, its connections
dropped: the requests in flight on it fail); ``--restart-after`` seconds later
it is started again on the same port (``0``: never).

The pool's own counters (pairs answered per host, the summary's "pairs per
host") are read at each event, so each phase shows where the work went.

Targets (issue 5): the run completes (exit OK, exactly N records, unique ids),
and the work shifts to the live host (A serves no pair while it is down, B
serves all of them); with a restart, A serves pairs again.  Exit 1 when one is
missed.

    python benchmarks/multihost.py
    python benchmarks/multihost.py --pairs 1000 --stop-after 200 --restart-after 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FIXTURE,
    MODEL,
    TESTS,
    machine,
    scripted_text,
    table,
    tune_test_server,
    verdict,
)


def start_servers(latency: float, per_host: int) -> list[Any]:
    sys.path.insert(0, str(TESTS))
    import ollama_server
    from ollama_server import OllamaTestServer, ScriptedEngine, load_fixture_model

    tune_test_server(ollama_server)
    servers = []
    for _ in range(2):
        engine = ScriptedEngine(latency=latency, text_fn=scripted_text)
        model = load_fixture_model(FIXTURE, engine)
        servers.append(OllamaTestServer([model], slots=per_host).start())
    return servers


async def run(
    args: argparse.Namespace,
) -> tuple[list[list[Any]], list[tuple[str, bool]], dict[str, Any]]:
    from magpie.commands.generate import agenerate
    from magpie.settings import RunConfig

    a, b = start_servers(args.latency, args.per_host)
    loop = asyncio.get_running_loop()
    pool: Any = None
    events: list[tuple[str, float, Counter[str]]] = []  # (event, time, pairs per host)
    first_a_after_restart: float | None = None
    t0 = time.monotonic()
    tasks: list[asyncio.Task[None]] = []

    def snapshot(name: str) -> None:
        events.append((name, time.monotonic() - t0, Counter(pool.pairs)))

    async def stop_phase() -> None:
        await loop.run_in_executor(None, a.stop)
        # Answers A finished before it stopped may still be on their way up the
        # stack; after this settle, A can count no new pair.
        await asyncio.sleep(0.2)
        snapshot("A stopped")
        if args.restart_after > 0:
            await asyncio.sleep(args.restart_after)
            await loop.run_in_executor(None, a.start)
            snapshot("A restarted")
            tasks.append(asyncio.create_task(watch_a()))

    async def watch_a() -> None:
        nonlocal first_a_after_restart
        base = pool.pairs[a.url]
        while pool.pairs[a.url] == base:
            await asyncio.sleep(0.02)
        first_a_after_restart = time.monotonic() - t0 - events[-1][1]

    def on_start(prep: Any, existing: Any, target: int) -> None:
        nonlocal pool, t0
        pool = prep.backend
        t0 = time.monotonic()
        snapshot("start")

    def on_result(item: Any, stats: Any) -> None:
        if stats.written == args.stop_after and not tasks:
            snapshot("stopping A")
            tasks.append(asyncio.create_task(stop_phase()))

    with tempfile.TemporaryDirectory(prefix="magpie-multihost-") as tmp:
        out = Path(tmp) / "out.jsonl"
        cfg = RunConfig(
            num=args.pairs,
            output=str(out),
            backend="ollama",
            model=MODEL,
            host=[a.url, b.url],
            per_host=args.per_host,
            concurrency=2 * args.per_host,
            seed=7,
            backoff_base=0.05,
            quiet=True,
        )
        error = None
        try:
            result = await agenerate(cfg, on_start=on_start, on_result=on_result)
        except Exception as exc:  # noqa: BLE001 - reported as a missed target
            error = exc
            result = getattr(exc, "result", None)
        snapshot("end")
        for t in tasks:
            t.cancel()
        lines = out.read_bytes().splitlines() if out.exists() else []
        ids = {json.loads(line)["id"] for line in lines}
        hosts = Counter(json.loads(line).get("host") for line in lines)
    for srv in (a, b):
        srv.stop()

    names = {a.url: "A", b.url: "B"}
    rows = []
    phase_pairs: dict[str, Counter[str]] = {}
    for (name, t, counts), (next_name, t_next, next_counts) in zip(
        events, events[1:], strict=False
    ):
        phase = f"{name} -> {next_name}"
        diff = Counter({h: next_counts[h] - counts[h] for h in set(next_counts) | set(counts)})
        phase_pairs[phase] = diff
        total = sum(diff.values())
        dur = t_next - t
        rows.append(
            [
                phase,
                f"{t:.2f} -> {t_next:.2f}",
                diff[a.url],
                diff[b.url],
                total,
                total / dur if dur > 0 else 0.0,
            ]
        )
    stats = result.stats if result is not None else None
    summary = stats.summary() if stats is not None else ""
    checks = [
        (
            f"run completed: {'no error' if error is None else f'error {error!r}'}, exit status "
            f"{int(result.exit_status) if result is not None else '?'}",
            error is None and result is not None and int(result.exit_status) == 0,
        ),
        (
            f"exactly {args.pairs} records with unique ids (file: {len(lines)} lines, {len(ids)} ids)",
            len(lines) == args.pairs and len(ids) == args.pairs,
        ),
    ]
    down = next((p for p in phase_pairs if p.startswith("A stopped")), None)
    if down is not None:
        d = phase_pairs[down]
        checks.append(
            (
                f"while A was down: A served {d[a.url]} pairs, B served {d[b.url]}",
                d[a.url] == 0 and d[b.url] > 0,
            )
        )
    else:
        checks.append(("A was stopped during the run (raise --pairs or lower --stop-after)", False))
    if args.restart_after > 0:
        back = next((p for p in phase_pairs if p.startswith("A restarted")), None)
        got = phase_pairs[back][a.url] if back else 0
        when = (
            f", first pair {first_a_after_restart:.2f} s after the restart"
            if first_a_after_restart is not None
            else ""
        )
        checks.append((f"after A restarted: A served {got} pairs{when}", got > 0))
    checks.append((f'the summary reports pairs per host: "{summary}"', "pairs per host" in summary))
    info = {
        "records per host (record.host)": {names.get(h, h): n for h, n in hosts.items()},
        "retries": dict(stats.retries) if stats else {},
    }
    return rows, checks, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--stop-after", type=int, default=150, help="pairs written, then A stops")
    parser.add_argument(
        "--restart-after", type=float, default=3.0, help="seconds A stays down (0: for good)"
    )
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--per-host", type=int, default=4, help="slots per server = per_host")
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}\n")
    print(
        f"Servers: 2 x tests/support/ollama_server.py ScriptedEngine in this process, latency "
        f"{args.latency:g} s per request, {args.per_host} slots each; magpie per_host "
        f"{args.per_host}, concurrency {2 * args.per_host}; A = first --host, B = second.\n"
    )
    rows, checks, info = asyncio.run(run(args))
    print(table(["phase", "seconds", "pairs on A", "pairs on B", "pairs", "pairs/s"], rows))
    print()
    for key, value in info.items():
        print(f"- {key}: {value}")
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
