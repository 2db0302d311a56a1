"""Reasoning models: the thinking split off answers, kept out of instructions,
and ``--reasoning keep|drop|off``, over the real ``ollama`` client and the
real ``magpie`` command against the Ollama and OpenAI test doubles (whose
thinking parser is Ollama's, ported; tests/real/test_reasoning.py holds the
real server to it)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, ThinkingParser, load_fixture_model

from magpie.backends.base import Completion
from magpie.pipeline.stages.reasoning import split_reasoning
from magpie.records import Record

QUESTIONS = [
    "Why does the sea have tides?",
    "How do I bake sourdough bread at home?",
    "What is the capital city of Australia and why was it chosen?",
    "Explain recursion to a ten year old.",
    "Write a haiku about autumn leaves falling.",
    "Which programming language should a beginner learn first?",
]
THOUGHT = "The user asks about tides. The moon pulls the oceans."
ANSWER = "Tides come from the moon's gravity pulling on the oceans."


def _text(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    """A reasoning model: instructions as a user writes them, answers after a
    <think> block."""
    if isinstance(source, str):
        return QUESTIONS[int(options.get("seed") or 0) % len(QUESTIONS)]
    return f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"


@pytest.fixture()
def thinking_ollama() -> Iterator[OllamaTestServer]:
    """The double serving qwen3:8b (its real template and capabilities) and a
    model without thinking (llama3.1)."""
    engine = ScriptedEngine(text_fn=_text)
    models = [load_fixture_model(slug, engine) for slug in ("qwen3", "deepseek-r1", "llama3.1")]
    with OllamaTestServer(models) as srv:
        yield srv


def _generate(srv: OllamaTestServer, *args: str, model: str = "qwen3:8b") -> list[Record]:
    proc = run_magpie("generate", "-n", "2", "--model", model, "--host", srv.url, *args)
    assert proc.returncode == 0, proc.stderr
    return [Record.model_validate_json(line) for line in proc.stdout.splitlines() if line]


# -- splitting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "thinking", "answer", "reasoning", "unfinished"),
    [
        ("<think>\nA plan.\n</think>\n\nThe answer.", None, "The answer.", "A plan.", False),
        # DeepSeek-R1 / Qwen3-Thinking: the generation prompt opened the block.
        ("A plan.\n</think>\n\nThe answer.", None, "The answer.", "A plan.", False),
        # Qwen3 with thinking off writes an empty block.
        ("<think>\n\n</think>\n\nThe answer.", None, "The answer.", None, False),
        # Cut off while thinking: no answer at all.
        ("<think>\nA plan that goes on", None, "", "A plan that goes on", True),
        # The server parsed it (Ollama thinking, OpenAI reasoning_content).
        ("The answer.", "A plan.", "The answer.", "A plan.", False),
        # gpt-oss's harmony channels, written out.
        (
            "<|channel|>analysis<|message|>A plan.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>The answer.<|return|>",
            None,
            "The answer.",
            "A plan.",
            False,
        ),
        ("No reasoning at all.", None, "No reasoning at all.", None, False),
    ],
)
def test_split_reasoning(
    text: str, thinking: str | None, answer: str, reasoning: str | None, unfinished: bool
) -> None:
    got = split_reasoning(Completion(text=text, thinking=thinking))
    assert got == (answer, reasoning, unfinished)


def test_the_doubles_parser_is_ollamas() -> None:
    """Ported from thinking/parser.go: whitespace eaten, tags split over pieces."""
    p = ThinkingParser()
    pieces = ["  <thi", "nk>\n", "Plan", " it.</th", "ink>", "\n\n", "Answer", " here."]
    out = [p.add(x) for x in pieces]
    assert "".join(t for t, _ in out) == "Plan it."
    assert "".join(c for _, c in out) == "Answer here."
    q = ThinkingParser()
    assert q.add("Plain answer <think>") == ("", "Plain answer <think>")


# -- through the Ollama double ---------------------------------------------------


def test_keep_puts_the_thinking_in_its_own_fields(thinking_ollama: OllamaTestServer) -> None:
    recs = _generate(thinking_ollama)
    assert len(recs) == 2
    for rec in recs:
        assert rec.template == "qwen3" and rec.template_source == "ollama-auto"
        assert rec.response == ANSWER and rec.reasoning == THOUGHT
        assert rec.instruction in QUESTIONS
        user, assistant = rec.messages
        assert assistant.content == ANSWER and assistant.reasoning_content == THOUGHT
        assert user.reasoning_content is None
        assert "reasoning_content" not in user.model_dump()
    # Ollama thinks by default for this model: the chat asks nothing, and the
    # thinking came back apart (message.thinking), not inline.
    chats = thinking_ollama.requests_to("/api/chat")
    assert chats and all("think" not in r.body for r in chats)
    # Raw instruction requests never let the server parse thinking.
    gens = thinking_ollama.requests_to("/api/generate")
    assert gens and all(r.body["raw"] is True and r.body["think"] is False for r in gens)


def test_drop_leaves_no_reasoning(thinking_ollama: OllamaTestServer) -> None:
    recs = _generate(thinking_ollama, "--reasoning", "drop")
    for rec in recs:
        assert rec.response == ANSWER and rec.reasoning is None
        assert rec.messages[1].reasoning_content is None
        assert "reasoning_content" not in json.dumps(rec.model_dump(mode="json")["messages"])


def test_off_asks_the_model_not_to_think(thinking_ollama: OllamaTestServer) -> None:
    """think: false reaches the server; the server then parses nothing, so the
    model's inline block comes back in the content and is split off there."""
    recs = _generate(thinking_ollama, "--reasoning", "off", model="deepseek-r1:8b")
    assert [r.template for r in recs] == ["deepseek-r1", "deepseek-r1"]
    chats = thinking_ollama.requests_to("/api/chat")
    assert chats and all(r.body["think"] is False for r in chats)
    for rec in recs:
        assert rec.response == ANSWER and rec.reasoning is None
        assert "<think>" not in rec.response and "</think>" not in rec.response


def test_off_on_a_model_without_thinking(thinking_ollama: OllamaTestServer) -> None:
    """think: false is accepted by any model (true is refused: 400)."""
    recs = _generate(thinking_ollama, "--reasoning", "off", model="llama3.1:8b")
    # No server parser for this model: the inline block is split by magpie.
    assert all(r.response == ANSWER and r.reasoning is None for r in recs)


def test_a_model_without_thinking_keeps_inline_reasoning(
    thinking_ollama: OllamaTestServer,
) -> None:
    recs = _generate(thinking_ollama, model="llama3.1:8b")
    assert all(r.response == ANSWER and r.reasoning == THOUGHT for r in recs)


def test_instructions_never_hold_thinking(tmp_path: Path) -> None:
    def text(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
        if isinstance(source, str):
            return "<think>I should ask about tides.</think> Why are there tides?"
        return ANSWER

    engine = ScriptedEngine(text_fn=text)
    rejects = tmp_path / "rejects.jsonl"
    with OllamaTestServer([load_fixture_model("llama3.1", engine)]) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--model",
            "llama3.1:8b",
            "--host",
            srv.url,
            "--rejects",
            str(rejects),
        )
    assert proc.stdout == ""
    reasons = [json.loads(line)["reject_reason"] for line in rejects.read_text().splitlines()]
    assert reasons and set(reasons) == {"reasoning_in_instruction"}


def test_an_answer_cut_off_while_thinking_is_rejected(tmp_path: Path) -> None:
    def text(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
        if isinstance(source, str):
            return QUESTIONS[int(options.get("seed") or 0) % len(QUESTIONS)]
        return "<think>\nLet me think about this for a long while"

    engine = ScriptedEngine(text_fn=text)
    rejects = tmp_path / "rejects.jsonl"
    with OllamaTestServer([load_fixture_model("qwen3", engine)]) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--model",
            "qwen3:8b",
            "--host",
            srv.url,
            "--rejects",
            str(rejects),
        )
    assert proc.stdout == ""
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert rejected and {r["reject_reason"] for r in rejected} == {"reasoning_only"}


def test_the_double_refuses_think_for_a_model_without_it(
    thinking_ollama: OllamaTestServer,
) -> None:
    import ollama

    client = ollama.Client(host=thinking_ollama.url)
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], think=True)
    assert exc.value.status_code == 400
    assert exc.value.error == '"llama3.1:8b" does not support thinking'


# -- through the OpenAI double ---------------------------------------------------


def test_openai_reasoning_content(tmp_path: Path) -> None:
    from openai_server import OpenAITestServer, ServedModel

    engine = ScriptedEngine(text_fn=_text)
    out = tmp_path / "out.jsonl"
    with OpenAITestServer(
        [ServedModel("qwen3", engine)], flavor="llamacpp", reasoning_format="deepseek"
    ) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--backend",
            "openai",
            "--host",
            srv.url,
            "--template",
            "qwen3",
            "-o",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        (rec,) = [Record.model_validate_json(x) for x in out.read_text().splitlines()]
        assert rec.response == ANSWER and rec.reasoning == THOUGHT
        chat = srv.requests_to("/v1/chat/completions")[0].body
        assert "chat_template_kwargs" not in chat
        proc = run_magpie(
            "generate",
            "-n",
            "1",
            "--backend",
            "openai",
            "--host",
            srv.url,
            "--template",
            "qwen3",
            "--reasoning",
            "off",
        )
        assert proc.returncode == 0, proc.stderr
        chat = srv.requests_to("/v1/chat/completions")[-1].body
        assert chat["chat_template_kwargs"] == {"enable_thinking": False}
        (rec,) = [Record.model_validate_json(x) for x in proc.stdout.splitlines()]
        assert rec.response == ANSWER and rec.reasoning is None
