"""``--balance`` (issue 13): the judge's task categories kept near an even
spread; over-quota instructions rejected before their response with
``--prejudge``; a top-up keeps balancing; a model that cannot fill the caps
stops with a message that says so."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from batch_helpers import json_lines
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, build_models
from ollama_server import _instruction as scripted_instruction
from samples import make_record, verdict

from magpie.pipeline.stages.balance import CategoryBalance
from magpie.records import SEED_SLOTS, JudgeTags, Record

CATS = ["Math", "Coding & Debugging", "Creative writing"]


def skewed(source, options):  # type: ignore[no-untyped-def]
    """Instructions 'Topic N'; the judge calls 70% of them Math, 20% Coding &
    Debugging and 10% Creative writing."""
    if isinstance(source, str):
        seed = options.get("seed", 0)
        return f"Topic {(seed // SEED_SLOTS) % 1000} question: {scripted_instruction(seed)}"
    system = source[0]["content"] if source[0]["role"] == "system" else ""
    if "data-quality judge" not in system:
        return "Here is an answer: " + source[-1]["content"][:40]
    user = next(m["content"] for m in source if m["role"] == "user")
    found = re.search(r"Topic (\d+) question", user)
    n = int(found.group(1)) % 10 if found else 0
    category = CATS[0] if n < 7 else CATS[1] if n < 9 else CATS[2]
    return json.dumps(verdict(task_category=category))


def _run(srv: OllamaTestServer, out: Path, n: int, *extra: str):  # type: ignore[no-untyped-def]
    return run_magpie(
        "generate",
        "-n",
        str(n),
        "--model",
        "llama3.1:8b",
        "--host",
        srv.url,
        "--seed",
        "2",
        "--judge",
        "same",
        "--balance",
        "--categories",
        ",".join(CATS),
        "-o",
        str(out),
        *extra,
    )


def test_balance_gives_an_even_spread_before_responses(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("balance_tolerance = 0.0\n")
    out, rej = tmp_path / "d.jsonl", tmp_path / "rej.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine(text_fn=skewed))) as srv:
        proc = _run(
            srv, out, 9, "--prejudge", "--config", str(tmp_path / "c.toml"), "--rejects", str(rej)
        )
        chats = srv.requests_to("/api/chat")
        assert proc.returncode == 0, proc.stderr
        counts = Counter(r["judge"]["task_category"] for r in json_lines(out.read_text()))
        assert counts == {c: 3 for c in CATS}
        rejects = [r for r in json_lines(rej.read_text()) if r["reject_reason"] == "over_quota"]
        assert rejects and "over_quota" in proc.stderr.splitlines()[-1]
        # Rejected at the pre-judge: no answer was generated for most of them
        # (one reserved in flight can still be refused when emitted).
        answered = {
            c.body["messages"][-1]["content"]
            for c in chats
            if "data-quality judge" not in c.body["messages"][0]["content"]
        }
        early = [r for r in rejects if r["reject_stage"] == "instruction"]
        assert len(early) >= len(rejects) - 2 and not answered & {r["instruction"] for r in early}
        settings = json.loads((tmp_path / "d.jsonl.manifest.json").read_text())["settings"]
        assert settings["balance"] == {"categories": CATS, "tolerance": 0.0}

        # A top-up keeps balancing, counting the records already there.
        more = _run(srv, out, 12, "--prejudge", "--config", str(tmp_path / "c.toml"))
        assert more.returncode == 0, more.stderr
    counts = Counter(r["judge"]["task_category"] for r in json_lines(out.read_text()))
    assert counts == {c: 4 for c in CATS}


def test_balance_without_prejudge_is_exact_at_emit(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine(text_fn=skewed))) as srv:
        proc = _run(srv, out, 12, "-c", "8")  # tolerance 0.25: cap ceil(12/3 * 1.25) = 5
    assert proc.returncode == 0, proc.stderr
    counts = Counter(r["judge"]["task_category"] for r in json_lines(out.read_text()))
    assert sum(counts.values()) == 12 and max(counts.values()) <= 5


def test_caps_a_model_cannot_fill_stop_the_run_with_the_counts(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine(text_fn=skewed))) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "40",
            "--model",
            "llama3.1:8b",
            "--host",
            srv.url,
            "--judge",
            "same",
            "--prejudge",
            "--balance",
            "--categories",
            "Math,Editing",  # Editing never comes: Math fills its cap, then everything is refused
            "-o",
            str(out),
        )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "over_quota" in last and "--balance" in last and "Math 25" in last, last
    assert len(json_lines(out.read_text())) == 25  # ceil(40 / 2 * 1.25), kept


def test_balance_needs_a_judge() -> None:
    proc = run_magpie("generate", "--backend", "ollama", "--balance")
    assert proc.returncode == 2 and "it needs --judge" in proc.stderr


def test_settle_releases_reservations() -> None:
    b = CategoryBalance(4, ["Math", "Editing"], tolerance=0.0)  # cap 2
    assert b.cap == 2
    assert b.reserve(0, "Math") is None and b.reserve(1, "Math") is None
    assert b.reserve(2, "Math") == "over_quota"  # two in flight fill the cap
    assert b.reserve(3, "Others") is None  # not balanced: --categories decides
    rec: Record = make_record(0)
    rec.judge = JudgeTags(task_category="Math", judge_model="j")
    assert isinstance(b.settle(rec), Record) and b.kept["Math"] == 1
    from magpie.records import Rejection

    b.settle(Rejection(index=1, reason="response_truncated"))  # index 1's slot is freed
    assert b.reserve(4, "Math") is None
