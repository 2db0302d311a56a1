"""``--samples-per-request``: instruction requests and pairs/s, N = 1 vs N = 8.

The OpenAI-protocol test server (tests/support/openai_server.py, vLLM flavour) runs in
this process with a scripted engine and a fixed ``--latency`` per request,
whatever its ``n`` (a server that decodes the n samples of a request together);
the instructions are pseudo-word sentences drawn from each sample's seed, so
near-duplicate dedup (on, as by default) rejects none of them.  ``magpie
generate --backend openai`` runs as a subprocess (its own CPU and GIL) for each
N in turn, ``--repeats`` times, alternating; pairs/s is the run's own summary
(``--log-format json``: ``written / elapsed_s``), instruction requests are the
server's count of ``POST /v1/completions``, CPU is ``getrusage`` of the magpie
process (client, start-up included) and of this process (the server's threads).

What it shows: the client side of N samples per request: N times fewer
instruction requests, and the CPU they cost on both sides.  Pairs/s at the
same ``-c`` does not change here, by design: ``-c K`` is K pairs in flight, the
N attempts of a group wait for its one request together, so the server runs
the same number of sequences and each pair still waits for one instruction and
one answer.  What it cannot show: vLLM's gain, the prefill of the pre-query
done once for N samples (its prefix cache already shares much of it between
requests) and fewer requests to schedule; the test server has no prefill.

Targets: both runs write every record; N = 8 makes at most 1/8 of N = 1's
instruction requests (plus one for a group whose later samples were not
needed).  Exit 1 when one is missed.

    python benchmarks/samples_per_request.py
    python benchmarks/samples_per_request.py --pairs 960 --latency 0.05 --concurrency 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TESTS, machine, scripted_text, table, tune_test_server, verdict  # noqa: E402

MODEL = "bench"


def start_server(latency: float) -> Any:
    sys.path.insert(0, str(TESTS))
    import ollama_server
    from openai_server import OpenAITestServer, ScriptedEngine, ServedModel

    tune_test_server(ollama_server)
    engine = ScriptedEngine(text_fn=scripted_text)
    return OpenAITestServer([ServedModel(MODEL, engine)], flavor="vllm", latency=latency).start()


def run_once(url: str, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out, log = tmp / f"n{n}.jsonl", tmp / f"n{n}.log"
    for p in (out, log):
        p.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "magpie",
        "generate",
        "--backend",
        "openai",
        "--host",
        url,
        "--model",
        MODEL,
        "--template",
        "chatml",
        "-n",
        str(args.pairs),
        "-c",
        str(args.concurrency),
        "--samples-per-request",
        str(n),
        "--seed",
        "1",
        "-o",
        str(out),
        "--overwrite",
        "--quiet",
        "--log-file",
        str(log),
        "--log-format",
        "json",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGPIE_")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    client, server = (
        (a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime)
        for a, b in zip(after, before, strict=True)
    )
    if proc.returncode != 0:
        raise SystemExit(f"magpie failed (N={n}): {proc.stderr.strip()}")
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summary = next(e for e in events if e.get("event") == "summary")
    records = out.read_bytes().count(b"\n")
    return {
        "records": records,
        "attempts": summary["attempts"],
        "elapsed": summary["elapsed_s"],
        "pairs_s": summary["written"] / summary["elapsed_s"],
        "client_ms": 1000 * client / max(1, records),
        "server_ms": 1000 * server / max(1, records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=480)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=16, help="pairs in flight (-c)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    print(f"# --samples-per-request: {machine()}\n")
    print(
        f"{args.pairs} pairs, latency {args.latency:g} s per request (instruction or answer), "
        f"-c {args.concurrency}, {args.repeats} runs per N (alternating), median shown\n"
    )
    srv = start_server(args.latency)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.samples}
    try:
        with tempfile.TemporaryDirectory(prefix="magpie-spr-") as tmp:
            for _ in range(args.repeats):
                for n in args.samples:
                    srv.clear_requests()
                    result = run_once(srv.url, n, args, Path(tmp))
                    result["instruction_requests"] = srv.served["/v1/completions"]
                    result["chat_requests"] = srv.served["/v1/chat/completions"]
                    result["samples"] = srv.samples["/v1/completions"]
                    runs[n].append(result)
    finally:
        srv.stop()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    base = args.samples[0]
    rows = []
    for n in args.samples:
        rows.append(
            [
                n,
                int(med(n, "instruction_requests")),
                int(med(n, "samples")),
                int(med(n, "chat_requests")),
                int(med(n, "attempts")),
                med(n, "elapsed"),
                med(n, "pairs_s"),
                med(n, "pairs_s") / med(base, "pairs_s"),
                med(n, "client_ms"),
                med(n, "server_ms"),
                " / ".join(f"{r['pairs_s']:.1f}" for r in runs[n]),
            ]
        )
    print(
        table(
            [
                "N",
                "instruction requests",
                "samples",
                "chat requests",
                "attempts",
                "seconds",
                "pairs/s",
                f"x N={base}",
                "client CPU ms/pair",
                "server CPU ms/pair",
                "pairs/s of each run",
            ],
            rows,
        )
    )
    k, lat = args.concurrency, args.latency
    print(
        f"\nReference: K / (2 x latency) = {k / (2 * lat):.1f} pairs/s, whatever N: each pair "
        "waits for its instruction (alone or with its group) and for its answer."
    )
    checks = [
        (
            f"N={n}: every run wrote {args.pairs} records",
            all(r["records"] == args.pairs for r in runs[n]),
        )
        for n in args.samples
    ]
    if len(args.samples) >= 2:
        lo, hi = args.samples[0], args.samples[-1]
        ratio = med(hi, "instruction_requests") / med(lo, "instruction_requests")
        bound = math.ceil(med(lo, "instruction_requests") / hi) + 1
        checks.append(
            (
                f"N={hi} makes {ratio:.3f} x N={lo}'s instruction requests "
                f"({int(med(hi, 'instruction_requests'))} <= {bound})",
                med(hi, "instruction_requests") <= bound,
            )
        )
    return verdict(checks)


if __name__ == "__main__":
    sys.exit(main())
