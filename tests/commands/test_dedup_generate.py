"""Dedup inside `magpie generate` (across runs) and the `magpie dedup` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batch_helpers import assert_exact, gen_args, json_lines
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, build_models

TOPICS = [
    "the ocean at night",
    "a lighthouse keeper",
    "autumn leaves in Kyoto",
    "a robot learning to paint",
    "my grandmother's kitchen",
    "the first day of school",
    "a city after the rain",
    "an old violin",
]


def repetitive(source, options):  # type: ignore[no-untyped-def]
    """Instructions from a small pool, with small variations: many duplicates."""
    if isinstance(source, list):
        return "Here is an answer about " + source[-1]["content"][:30]
    h = int(hashlib.blake2b(str(options.get("seed", 0)).encode(), digest_size=4).hexdigest(), 16)
    topic = TOPICS[h % len(TOPICS)]
    ending = "?" if (h >> 8) % 2 else "."
    return f"Could you write a short poem about {topic}{ending}"


def server() -> OllamaTestServer:
    return OllamaTestServer(build_models(["llama3.1"], ScriptedEngine(text_fn=repetitive)))


def test_generate_never_keeps_a_near_duplicate_across_runs(tmp_path: Path) -> None:
    out, rej = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    with server() as srv:
        first = run_magpie(*gen_args(srv, out, 4, "--seed", "1", "--rejects", str(rej)))
        assert first.returncode == 0, first.stderr
        assert (tmp_path / "d.jsonl.dedup.npz").exists()
        second = run_magpie(*gen_args(srv, out, 8, "--rejects", str(rej)))
        assert second.returncode == 0, second.stderr
        chats = len(srv.requests_to("/api/chat"))
    recs = assert_exact(out, 8)
    topics = [next(t for t in TOPICS if t in r.instruction) for r in recs]
    assert sorted(topics) == sorted(TOPICS)  # one record per topic, across both runs
    dups = [r for r in json_lines(rej.read_text()) if r["reject_reason"] == "duplicate"]
    assert dups and all("duplicate of" in r["reject_detail"] for r in dups)
    # Duplicates of records already written are caught before their response.
    assert chats < 8 + len(dups)
    assert "duplicate" in second.stderr.splitlines()[-1]


def test_no_dedup_keeps_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with server() as srv:
        proc = run_magpie(*gen_args(srv, out, 12, "--seed", "1", "--no-dedup"))
    assert proc.returncode == 0, proc.stderr
    recs = assert_exact(out, 12)
    assert len({r.instruction for r in recs}) < 12


def test_dedup_command(tmp_path: Path) -> None:
    src, dst, rej = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    with server() as srv:
        assert run_magpie(*gen_args(srv, src, 20, "--seed", "3", "--no-dedup")).returncode == 0
    proc = run_magpie("dedup", str(src), "-o", str(dst), "--rejects", str(rej))
    assert proc.returncode == 0, proc.stderr
    kept, dropped = json_lines(dst.read_text()), json_lines(rej.read_text())
    assert len(kept) + len(dropped) == 20 and len(kept) <= len(TOPICS)
    kept_ids = {r["id"] for r in kept}
    assert all(r["duplicate_of"] in kept_ids for r in dropped)
    assert "duplicates dropped" in proc.stderr
    again = run_magpie("dedup", str(src), "-o", str(dst))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert json.loads(dst.read_text().splitlines()[0])["id"] == kept[0]["id"]
