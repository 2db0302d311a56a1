"""Diversity of instructions: plain runs against persona and topic runs.

Runs the real ``magpie generate`` on the embedded default (SmolLM2-135M-Instruct)
once per configuration, same size and seed, then reads each output with
``magpie stats`` (``magpie.commands.stats.compute_stats``) and prints one table
row per configuration: distinct-1/2, the share of the top opening, and the
spread of personas/topics.  Responses are capped (``--response-max-tokens``,
kept when cut) because only the instructions are measured; the outputs stay
in ``--out`` for reading.

    python benchmarks/diversity.py --num 200                 # plain, personas, topics, both
    python benchmarks/diversity.py --num 200 --only plain personas
    python benchmarks/diversity.py --num 80 --persona-templates   # the template candidates
    python benchmarks/diversity.py --num 200 --sampling --response-max-tokens 16
                                                    # personas at narrower samplings

Run it alone: it loads a model (never two at once on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from magpie.commands.stats import compute_stats

#: The persona templates compared for the default (DEFAULT_TEMPLATES["persona"]).
PERSONA_TEMPLATES = {
    "talking-with": "{system} You are talking with {persona}. They ask you for help with something from their own life or work.",
    "user-is": "{system} The user is {persona}.",
    "helping": "{system} Today you are helping {persona}, who asks you a question about their day-to-day life.",
}

#: Instruction samplings compared by --sampling (with --personas everyday).
SAMPLINGS = {
    "t0.8": ["--instruction-temperature", "0.8"],
    "top-p0.9": ["--instruction-top-p", "0.9"],
    "min-p0.05": ["--instruction-min-p", "0.05"],
    "t1.2-min-p0.1": ["--instruction-temperature", "1.2", "--instruction-min-p", "0.1"],
    "t1.5-min-p0.1": ["--instruction-temperature", "1.5", "--instruction-min-p", "0.1"],
}


def run(name: str, args: list[str], num: int, seed: int, out: Path, max_tokens: int) -> dict:
    path = out / f"{name}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "magpie",
        "generate",
        "--backend",
        "embedded",
        "-n",
        str(num),
        "--seed",
        str(seed),
        "--response-max-tokens",
        str(max_tokens),
        "--keep-truncated",
        "--overwrite",
        "-q",
        "-o",
        str(path),
        *args,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    stats = compute_stats(path)
    d = stats.diversity
    spread = d.personas or d.topics
    return {
        "config": name,
        "args": " ".join(args) or "(none)",
        "records": stats.records,
        "keep_rate": stats.keep_rate,
        "distinct_1": d.distinct_1,
        "distinct_2": d.distinct_2,
        "top_opening_share": d.top_opening_share,
        "top_opening": d.openings[0].value if d.openings else "",
        "distinct_openings": d.distinct_openings,
        "spread_distinct": spread.distinct if spread else None,
        "spread_evenness": spread.evenness if spread else None,
        "wall_s": round(wall, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--response-max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/diversity"))
    ap.add_argument(
        "--persona-templates",
        action="store_true",
        help="compare the candidate persona templates instead",
    )
    ap.add_argument(
        "--sampling",
        action="store_true",
        help="compare narrower instruction samplings with --personas everyday instead",
    )
    ap.add_argument("--only", nargs="+", help="run only these configurations")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.persona_templates:
        configs = {
            f"persona-{k}": ["--personas", "everyday", "--persona-template", v]
            for k, v in PERSONA_TEMPLATES.items()
        }
    elif a.sampling:
        configs = {f"personas-{k}": ["--personas", "everyday", *v] for k, v in SAMPLINGS.items()}
    else:
        configs = {
            "plain": [],
            "personas": ["--personas", "everyday"],
            "topics": ["--topics", "general"],
            "personas+topics": ["--personas", "everyday", "--topics", "general"],
            "personas-helping": [
                "--personas",
                "everyday",
                "--persona-template",
                PERSONA_TEMPLATES["helping"],
            ],
        }
    if a.only:
        configs = {k: v for k, v in configs.items() if k in a.only}
    rows = [run(k, v, a.num, a.seed, a.out, a.response_max_tokens) for k, v in configs.items()]
    print(
        "| config | records | keep rate | distinct-1 | distinct-2 | top opening | "
        "distinct openings | personas/topics drawn | wall s |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        drawn = "–" if r["spread_distinct"] is None else f"{r['spread_distinct']}"
        print(
            f"| {r['config']} | {r['records']} | {100 * (r['keep_rate'] or 0):.0f}% | "
            f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
            f"{100 * r['top_opening_share']:.1f}% “{r['top_opening']}” | "
            f"{r['distinct_openings']} | {drawn} | {r['wall_s']} |"
        )
    (a.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
