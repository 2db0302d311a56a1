"""Near-duplicate dedup benchmark: synthetic instructions through ``magpie.pipeline.stages.dedup.index``.

    python benchmarks/dedup_bench.py            # 10k, 50k, 100k; exits 1 if 100k takes > 20 s
    python benchmarks/dedup_bench.py --sizes 20000 --no-file --limit 5

Each size runs in a fresh process, so that its peak RSS (VmHWM) is its own.
The synthetic instructions are filled-in templates over a vocabulary of random
pseudo-words: 80% unique, 10% planted exact duplicates (case, whitespace and
end punctuation changed) and 10% planted near duplicates (one word replaced,
inserted or deleted) of an earlier unique one.  Instructions from the same
template share most of their text (Jaccard about 0.35, up to 0.6), as
instructions from a small model do.

Columns: seconds through ``DedupIndex.check_and_add_many`` (hashing, LSH,
exact and near checks; data generation not counted), peak RSS and its growth
over the RSS before the run, duplicates found, recall on the planted exact and
near duplicates (near: also restricted to the pairs whose true character
5-gram Jaccard is at least the threshold) and uniques flagged (with how many
of them truly are within the threshold of the record they matched).
The ``--file`` rows time the same data as a magpie JSONL: ``dedup_file``
(record validation, I/O), ``DedupIndex.open`` rebuilding from the JSONL,
``save`` and ``open`` from the cache.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "vi",
    "so",
    "pe",
    "da",
    "gu",
    "zi",
    "fo",
    "be",
    "xa",
    "qu",
    "ri",
    "no",
    "te",
    "sa",
    "mo",
    "li",
    "ve",
    "chi",
]
TEMPLATES = [
    "Can you explain how {n} works in {n} and why it is important for the {n} we {v} every day?",
    "Write a {a} Python function that takes a list of {n} and returns the {n} of every {a} {n}.",
    "I'm planning a trip to {n} next {n}. What are the best places to {v} in {n} and {n}?",
    "What is the difference between a {a} {n} and a {n} when you {v} the {n} at home?",
    "Please help me draft an email to my {n} asking whether we can {v} the {a} {n} before {n}.",
    "How should I {v} my {n} if I want to improve my {n} without spending more than {d} {n}?",
    "Give me {d} creative ideas for a {a} {n} that a {n} could {v} during a {a} weekend.",
    "My {n} keeps trying to {v} the {n}; what {a} steps can I take to stop it happening again?",
    "Summarize the main arguments for and against {v}ing {a} {n} in modern {n} policy.",
    "Explain to a {d}-year-old child why the {n} is {a} and how {n} can {v} it.",
    "I have {d} {n} and {d} {n}. How many {a} {n} can I {v} if each one needs two {n}?",
    "Translate the sentence 'the {a} {n} will {v} the {n} tomorrow' into {n} and explain the grammar.",
    "What are the pros and cons of using {n} instead of {n} for a {a} {n} project?",
    "Act as a {a} {n} and tell me a short story about a {n} who wanted to {v} the {n}.",
    "Is it safe to {v} {n} with {n}, and what should a {a} {n} know before trying it?",
    "Compare {n} and {n} as tools to {v} a {a} {n}, with a table of their differences.",
]


def pseudo_words(rng: random.Random, k: int) -> list[str]:
    out: set[str] = set()
    while len(out) < k:
        out.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(out)


def fill(rng: random.Random, vocab: dict[str, list[str]]) -> str:
    parts = rng.choice(TEMPLATES).split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, rest = part.split("}", 1)
        out.append(str(rng.randint(2, 99)) if slot == "d" else rng.choice(vocab[slot]))
        out.append(rest)
    return "".join(out)


def exact_variant(rng: random.Random, text: str) -> str:
    case = rng.choice([str.upper, str.lower, str.title, str])
    words = case(text).rstrip("?.!").split(" ")
    i = rng.randrange(len(words))
    words[i] = words[i] + rng.choice(["  ", "\n", "\t"])
    return rng.choice(["", " ", "\n"]) + " ".join(words) + rng.choice(["", "!", "??", " .", "?"])


def near_variant(rng: random.Random, text: str, nouns: list[str]) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    op = rng.random()
    if op < 0.6:
        words[i] = rng.choice(nouns)
    elif op < 0.8:
        words.insert(i, rng.choice(nouns))
    else:
        del words[i]
    return " ".join(words)


def synthesize(n: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """Texts, their kind ("unique", "exact", "near") and the index of their source."""
    rng = random.Random(seed)
    vocab = {
        "n": pseudo_words(rng, 5000),
        "v": pseudo_words(rng, 1000),
        "a": pseudo_words(rng, 1000),
    }
    texts: list[str] = []
    kinds: list[str] = []
    sources: list[int] = []
    uniques: list[int] = []
    for i in range(n):
        r = rng.random()
        if uniques and r < 0.2:
            src = rng.choice(uniques)
            if r < 0.1:
                texts.append(exact_variant(rng, texts[src]))
                kinds.append("exact")
            else:
                texts.append(near_variant(rng, texts[src], vocab["n"]))
                kinds.append("near")
            sources.append(src)
        else:
            texts.append(fill(rng, vocab))
            kinds.append("unique")
            sources.append(i)
            uniques.append(i)
    return texts, kinds, sources


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MB (Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jaccard(a: str, b: str, k: int) -> float:
    from magpie.pipeline.stages.dedup.minhash import normalize

    def shingles(t: str) -> set[str]:
        t = normalize(t)
        return {t[i : i + k] for i in range(max(1, len(t) - k + 1))}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def child(n: int, seed: int, mode: str) -> dict:
    from magpie.pipeline.stages.dedup.index import DedupIndex

    texts, kinds, sources = synthesize(n, seed)
    items = [(f"r{i}", t) for i, t in enumerate(texts)]
    index = DedupIndex()
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    if mode == "batch":
        found = index.check_and_add_many(items)
    else:
        found = [index.check_and_add(i, t) for i, t in items]
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    th, k = index.threshold, index.shingle_size
    planted = {kind: [i for i in range(n) if kinds[i] == kind] for kind in ("exact", "near")}
    near_hard = [i for i in planted["near"] if jaccard(texts[i], texts[sources[i]], k) >= th]
    flagged = [i for i in range(n) if kinds[i] == "unique" and found[i] is not None]
    flagged_true = [
        i for i in flagged if jaccard(texts[i], texts[int(found[i].of_id[1:])], k) >= th
    ]

    def recall(rows: list[int]) -> float:
        return sum(found[i] is not None for i in rows) / max(1, len(rows))

    return {
        "n": n,
        "mode": mode,
        "seconds": seconds,
        "base_mb": base,
        "peak_mb": peak,
        "exact": sum(1 for d in found if d is not None and d.kind == "exact"),
        "near": sum(1 for d in found if d is not None and d.kind == "near"),
        "recall_exact": recall(planted["exact"]),
        "recall_near": recall(planted["near"]),
        "recall_near_hard": recall(near_hard),
        "planted_near_hard": len(near_hard),
        "planted_near": len(planted["near"]),
        "flagged_unique": len(flagged),
        "flagged_unique_true": len(flagged_true),
        "bands": f"{index.bands}x{index.rows_per_band}",
    }


def file_child(n: int, seed: int) -> dict:
    from magpie.commands.dedup import dedup_file
    from magpie.pipeline.stages.dedup.index import DedupIndex
    from magpie.records import Message, Record, StageInfo

    texts, _, _ = synthesize(n, seed)
    stage = StageInfo(temperature=1.0, top_p=1.0, max_tokens=512, seed=1, finish_reason="stop")
    proto = Record(
        id="x",
        index=0,
        instruction="",
        response="",
        messages=[],
        model="bench",
        backend="ollama",
        template="llama3",
        template_source="registry",
        instruction_generation=stage,
        response_generation=stage,
        seed=seed,
        created_at=datetime.now(timezone.utc),
    ).model_dump(mode="json")
    response = "A synthetic answer of some length. " * 12
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        with src.open("w", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                rec = dict(proto, id=f"{i:016x}", index=i, instruction=text, response=response)
                rec["messages"] = [
                    Message(role="user", content=text).model_dump(),
                    Message(role="assistant", content=response).model_dump(),
                ]
                fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        size_mb = src.stat().st_size / 1e6
        timings = {}
        t = time.perf_counter()
        counts = dedup_file(src, dst, rejects=Path(tmp) / "rejects.jsonl")
        timings["dedup_file"] = time.perf_counter() - t
        t = time.perf_counter()
        index = DedupIndex.open(dst)
        timings["open_rebuild"] = time.perf_counter() - t
        t = time.perf_counter()
        index.save(dst)
        timings["save"] = time.perf_counter() - t
        cache_mb = (dst.parent / (dst.name + ".dedup.npz")).stat().st_size / 1e6
        t = time.perf_counter()
        again = DedupIndex.open(dst)
        timings["open_cache"] = time.perf_counter() - t
        assert again.source == "cache" and len(again) == counts.kept
    return {
        "n": n,
        "jsonl_mb": size_mb,
        "kept": counts.kept,
        "cache_mb": cache_mb,
        "peak_mb": rss_mb("VmHWM"),
        **timings,
    }


def run_child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"benchmark child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument(
        "--limit", type=float, default=20.0, help="max seconds for the largest size"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-file", action="store_true", help="skip the JSONL file rows")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = file_child(args.child, args.seed) if args.mode == "file" else None
        result = result or child(args.child, args.seed, args.mode)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [run_child(["--child", str(n), "--seed", str(args.seed)]) for n in sizes]
    rows.append(run_child(["--child", str(sizes[-1]), "--mode", "single"]))
    print(
        f"{'n':>7} {'calls':>6} {'seconds':>8} {'rec/s':>7} {'peak RSS MB':>11} "
        f"{'growth MB':>9} {'KB/rec':>6} {'exact':>6} {'near':>6} {'recall exact':>12} "
        f"{'recall near':>11} {'(J>=t)':>7} {'uniques flagged (J>=t)':>22}"
    )
    for r in rows:
        growth = r["peak_mb"] - r["base_mb"]
        print(
            f"{r['n']:>7} {r['mode']:>6} {r['seconds']:>8.2f} {r['n'] / r['seconds']:>7.0f} "
            f"{r['peak_mb']:>11.0f} {growth:>9.0f} {growth * 1024 / r['n']:>6.2f} "
            f"{r['exact']:>6} {r['near']:>6} {r['recall_exact']:>12.4f} "
            f"{r['recall_near']:>11.4f} {r['recall_near_hard']:>7.4f} "
            f"{r['flagged_unique']:>14} ({r['flagged_unique_true']})"
        )
    print(
        f"LSH bands x rows: {rows[0]['bands']}; planted near duplicates with true Jaccard >= "
        f"threshold: {rows[-1]['planted_near_hard']} of {rows[-1]['planted_near']}"
    )
    if not args.no_file:
        f = run_child(["--child", str(sizes[-1]), "--mode", "file", "--seed", str(args.seed)])
        print(
            f"JSONL {f['n']} records ({f['jsonl_mb']:.0f} MB): dedup_file {f['dedup_file']:.2f} s, "
            f"DedupIndex.open rebuild {f['open_rebuild']:.2f} s, save {f['save']:.2f} s "
            f"({f['cache_mb']:.0f} MB), open from cache {f['open_cache']:.2f} s, "
            f"peak RSS {f['peak_mb']:.0f} MB"
        )
    largest = rows[len(sizes) - 1]
    if largest["seconds"] > args.limit:
        print(
            f"FAIL: {largest['n']} instructions took {largest['seconds']:.1f} s "
            f"(limit {args.limit:.0f} s)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
