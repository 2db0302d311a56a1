"""Memory of ``magpie export --format hf`` (or ``--format sqlite``): peak RSS at
1,000 vs 100,000 records.

Writes N synthetic records (judged, with a preference pair, ~1 KB each) to a
temporary JSONL, then exports it in a fresh child process (``--child``) and
reads that child's ``ru_maxrss``: the stats pass, the column scan and the
Parquet writes all stream, so the peak should not grow with N (the only
state that does is ``magpie stats``'s set of instruction hashes, 8 bytes a
record, and the Parquet writer's buffer of one row group).

Target (issue 14): growth from the small to the large export <= 50 MB.
Exit 1 when missed.

    python benchmarks/hf_export_memory.py                     # 1,000 vs 100,000 (~3 min on 2 cores)
    python benchmarks/hf_export_memory.py --format sqlite
    python benchmarks/hf_export_memory.py --sizes 1000 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_records(path: Path, n: int) -> None:
    from magpie.records import JudgeTags, Message, Record, StageInfo, record_id, utcnow

    stage = StageInfo(temperature=1.0, top_p=1.0, max_tokens=512, seed=3, finish_reason="stop")
    judge = JudgeTags(input_quality="good", difficulty="easy", task_category="Math",
                      response_score=8, judge_model="m", language="en")  # fmt: skip
    with path.open("w") as fh:
        for i in range(n):
            q = f"Question {i}: how do {i % 97} lanterns and {i % 89} libraries relate?"
            a = f"Answer {i}: " + "some helpful words " * 20
            user = Message(role="user", content=q)
            rec = Record(
                id=record_id("m", "t", 1, i), index=i, instruction=q, response=a,
                messages=[user, Message(role="assistant", content=a)], model="m",
                backend="ollama", template="llama3", template_source="registry",
                instruction_generation=stage, response_generation=stage, seed=1,
                created_at=utcnow(), judge=judge, responses=[a, "worse"],
                chosen=[user, Message(role="assistant", content=a)],
                rejected=[user, Message(role="assistant", content="worse")],
                score_chosen=8, score_rejected=3,
            )  # fmt: skip
            fh.write(rec.model_dump_json() + "\n")


def child(src: str, dst: str, fmt: str) -> None:
    t0 = time.perf_counter()
    if fmt == "sqlite":
        from magpie.commands.publish.sqlite import export_sqlite

        records, shards = export_sqlite(src, dst).records, 1
    else:
        from magpie.commands.publish.folder import export_hf

        res = export_hf(src, dst)
        records, shards = res.records, res.shards
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": records, "shards": shards, "peak_mb": peak_mb,
                      "seconds": time.perf_counter() - t0}))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=[1000, 100_000])
    ap.add_argument("--format", choices=["hf", "sqlite"], default="hf")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            src = Path(tmp) / f"d{n}.jsonl"
            write_records(src, n)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(Path(tmp) / f"out{n}"), args.format],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["input_mb"] = src.stat().st_size / 2**20
            rows.append(r)
            print(f"{n:>8,} records ({r['input_mb']:.0f} MB JSONL): peak RSS {r['peak_mb']:.1f} MB, "
                  f"{r['seconds']:.1f} s, {r['shards']} shard(s)")  # fmt: skip
    growth = rows[1]["peak_mb"] - rows[0]["peak_mb"]
    ok = growth <= 50
    print(f"{args.format}: growth {growth:+.1f} MB from {args.sizes[0]:,} to {args.sizes[1]:,}: "
          f"{'met' if ok else 'MISSED'} (target <= 50 MB)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
