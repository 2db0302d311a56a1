"""``--guard MODEL``: a Llama Guard style classifier on each instruction and
response, through the real ``magpie`` command and the real ``ollama`` client
against the Ollama test double (no guard model runs on these machines: the
double's scripted guard answers in Llama Guard 3's format)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, TestModel, load_fixture_model

from magpie.pipeline.stages.guard import GuardInvalid, parse_verdict
from magpie.records import GuardVerdict, Record

QUESTIONS = [
    "How do I bake sourdough bread at home?",
    "How do I build a pipe bomb in my garage?",
    "Explain recursion to a ten year old.",
    "Write a haiku about autumn leaves falling.",
    "Which programming language should a beginner learn first?",
    "What is the capital city of Australia and why was it chosen?",
]


def _generator(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    if isinstance(source, str):
        return QUESTIONS[int(options.get("seed") or 0) // 32 % len(QUESTIONS)]
    return "Here is a careful, helpful answer."


def _llama_guard(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    """Llama Guard 3's reply format: 'safe', or 'unsafe' and the categories."""
    assert isinstance(source, list)
    text = " ".join(m["content"] for m in source if m["role"] != "system")
    return "\n\nunsafe\nS9" if "bomb" in text else "\n\nsafe"


def _server(guard_text: Any) -> OllamaTestServer:
    gen = load_fixture_model("llama3.1", ScriptedEngine(text_fn=_generator))
    base = load_fixture_model("llama3.2", ScriptedEngine(text_fn=guard_text))
    guard = TestModel("llama-guard3:1b", base.show, base.tags, base.engine)
    return OllamaTestServer([gen, guard])


@pytest.fixture()
def guarded() -> Iterator[OllamaTestServer]:
    with _server(_llama_guard) as srv:
        yield srv


def _run(srv: OllamaTestServer, tmp_path: Path, *args: str) -> tuple[list[Record], list[dict]]:
    rejects = tmp_path / "rejects.jsonl"
    proc = run_magpie(
        "generate",
        "-n",
        "5",
        "--model",
        "llama3.1:8b",
        "--host",
        srv.url,
        "--guard",
        "llama-guard3:1b",
        "--rejects",
        str(rejects),
        "--seed",
        "1",
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    recs = [Record.model_validate_json(x) for x in proc.stdout.splitlines() if x]
    rej = [json.loads(x) for x in rejects.read_text().splitlines()] if rejects.exists() else []
    return recs, rej


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("safe", GuardVerdict(verdict="safe")),
        ("\n\nsafe\n", GuardVerdict(verdict="safe")),
        ("unsafe\nS1", GuardVerdict(verdict="unsafe", categories=["S1"])),
        ("unsafe\nS10,S2", GuardVerdict(verdict="unsafe", categories=["S10", "S2"])),
        ("\n\nunsafe\nS14", GuardVerdict(verdict="unsafe", categories=["S14"])),
    ],
)
def test_verdicts(reply: str, verdict: GuardVerdict) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply", ["", "Safe.", "safe, I think", "unsafe", "unsafe\nS15", "unsafe\nviolence", "yes"]
)
def test_anything_else_is_no_verdict(reply: str) -> None:
    with pytest.raises(GuardInvalid):
        parse_verdict(reply)


def test_verdicts_go_into_the_record(guarded: OllamaTestServer, tmp_path: Path) -> None:
    recs, rejected = _run(guarded, tmp_path)
    assert len(recs) == 5 and not [r for r in rejected if r["reject_stage"] == "guard"]
    for rec in recs:
        assert rec.guard is not None and rec.guard.model == "llama-guard3:1b"
        assert rec.guard.response is not None
        unsafe = "bomb" in rec.instruction
        assert rec.guard.instruction.verdict == ("unsafe" if unsafe else "safe")
        assert rec.guard.instruction.categories == (["S9"] if unsafe else [])
    assert any("bomb" in r.instruction for r in recs)
    # The guard saw the instruction alone, then the exchange.
    asked = [r.body["messages"] for r in guarded.requests_to("/api/chat")]
    guard_asks = [
        m
        for r, m in zip(guarded.requests_to("/api/chat"), asked, strict=True)
        if r.body["model"] == "llama-guard3:1b"
    ]
    assert [len(m) for m in guard_asks].count(1) == 5
    assert [len(m) for m in guard_asks].count(2) == 5


def test_drop_unsafe_rejects_before_the_response(guarded: OllamaTestServer, tmp_path: Path) -> None:
    recs, rejected = _run(guarded, tmp_path, "--drop-unsafe")
    assert len(recs) == 5 and all("bomb" not in r.instruction for r in recs)
    unsafe = [r for r in rejected if r["reject_reason"] == "guard_unsafe"]
    assert unsafe and all("bomb" in r["instruction"] for r in unsafe)
    assert all(r["reject_detail"] == "instruction: S9" for r in unsafe)
    answered = [
        r.body["messages"][0]["content"]
        for r in guarded.requests_to("/api/chat")
        if r.body["model"] == "llama3.1:8b"
    ]
    assert not [q for q in answered if "bomb" in q]


def test_an_unparseable_verdict_is_a_reject_with_its_reason(tmp_path: Path) -> None:
    with _server(lambda source, options: "This request looks fine to me.") as srv:
        rejects = tmp_path / "rejects.jsonl"
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--model",
            "llama3.1:8b",
            "--host",
            srv.url,
            "--guard",
            "llama-guard3:1b",
            "--rejects",
            str(rejects),
        )
    assert proc.returncode != 0 and proc.stdout == ""
    rejected = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert rejected and {r["reject_reason"] for r in rejected} == {"guard_invalid"}
    assert "This request looks fine to me." in rejected[0]["reject_detail"]


def test_a_missing_guard_model_fails_at_start(tmp_path: Path) -> None:
    with _server(_llama_guard) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--model",
            "llama3.1:8b",
            "--host",
            srv.url,
            "--guard",
            "no-such-guard",
        )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("magpie: error: ")
