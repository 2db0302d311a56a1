"""Turns 2..T of ``--turns`` go through every stage (issue 20, item 3): the rule
filters check each user turn and each answer, the guard classifies each
exchange, dedup checks a follow-up against its own conversation (never against
the index), the judge tags the whole conversation once; a rejected later turn
rejects the record as ``turnN_<reason>``.

Each test runs the real ``magpie`` command and the real ``ollama`` client
against the Ollama double, whose scripted engine writes conversations in
which a later turn (only) is what the stage must catch, keyed on the record's
turn-1 question so that every attempt's fate is known in advance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batch_helpers import MODEL, gen_args, json_lines, read_records
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, TestModel, load_fixture_model
from ollama_server import _instruction as scripted_instruction
from samples import make_record

from magpie.pipeline.stages.filters import (
    FilterSettings,
    build_answer_filters,
    build_filters,
    first_reason,
)
from magpie.pipeline.stages.judge import conversation_message
from magpie.records import SEED_SLOTS, Message, Record

GUARD = "llama-guard3:1b"
Source = str | list[dict[str, Any]]
#: ``follow_up(k, turn)``: the user turn ``turn`` > 1 of the record whose turn-1
#: question is number ``k``; ``answer(k, turn)``: its answer.
FollowUp = Callable[[int, int], str]


def _question(k: int) -> str:
    return f"Question {k}: {scripted_instruction(k)}"


def _k(text: str) -> int:
    found = re.search(r"Question (\d+):", text)
    assert found, text
    return int(found.group(1))


def _good_answer(k: int, turn: int) -> str:
    return f"Answer to question {k}, turn {turn}: water wears the rock away, slowly and surely."


def _good_follow_up(k: int, turn: int) -> str:
    return f"Could you give me one concrete example of that, as turn {turn} of this chat?"


def conversation_engine(
    follow_up: FollowUp = _good_follow_up,
    answer: FollowUp = _good_answer,
    judge: Callable[[str], int] | None = None,
) -> ScriptedEngine:
    """Turn 1 asks question ``k`` (from the request's seed); later turns and the
    answers are ``follow_up``/``answer`` of ``k`` and the turn.  A judge request
    (``--judge same``) is scored by ``judge(its user message)``."""

    def text(source: Source, options: Mapping[str, Any]) -> str:
        if isinstance(source, str):  # a raw completion: a user turn
            turn = 1 + source.count("Answer to question")
            if turn == 1:
                return _question(int(options.get("seed") or 0) // SEED_SLOTS)
            return follow_up(_k(source), turn)
        system = source[0]["content"] if source[0]["role"] == "system" else ""
        if "data-quality judge" in system:
            assert judge is not None
            return json.dumps(_tags(judge(source[-1]["content"])))
        turn = sum(m["role"] == "user" for m in source)
        return answer(_k(source[0]["content"]), turn)

    return ScriptedEngine(text_fn=text)


def _tags(score: int) -> dict[str, Any]:
    return {
        "input_quality": "good",
        "input_quality_explanation": "clear",
        "difficulty": "medium",
        "intent": "learn",
        "knowledge": "geology",
        "task_category": "Information seeking",
        "other_categories": [],
        "safety": "safe",
        "safety_reason": "",
        "language": "en",
        "response_score": score,
        "response_reason": "r",
    }


def _run(
    srv: OllamaTestServer, tmp_path: Path, n: int, *args: str
) -> tuple[list[Record], list[dict[str, Any]]]:
    out, rejects = tmp_path / "d.jsonl", tmp_path / "rejects.jsonl"
    proc = run_magpie(*gen_args(srv, out, n, "--seed", "3", "--rejects", str(rejects), *args))
    assert proc.returncode == 0, proc.stderr
    rejected = json_lines(rejects.read_text()) if rejects.exists() else []
    return read_records(out), rejected


def _users(messages: list[Any]) -> list[str]:
    return [
        m["content"] if isinstance(m, dict) else m.content for m in messages if _role(m) == "user"
    ]


def _role(m: Any) -> str:
    return m["role"] if isinstance(m, dict) else m.role


# ----------------------------------------------------------------- rule filters


def _filter_follow_up(k: int, turn: int) -> str:
    if turn == 2 and k % 5 == 0:
        return "Why?"
    if turn == 2 and k % 5 == 1:
        return "¿Puedes explicarme cómo funciona la fotosíntesis en las plantas y en las algas?"
    if turn == 3 and k % 5 == 3:
        return "Really?"
    return _good_follow_up(k, turn)


def _filter_answer(k: int, turn: int) -> str:
    if turn == 2 and k % 5 == 2:
        return "Sure, that is easy to show. Here are the steps you asked for:"
    return _good_answer(k, turn)


def test_filters_check_every_user_turn_and_answer(tmp_path: Path) -> None:
    engine = conversation_engine(_filter_follow_up, _filter_answer)
    with OllamaTestServer([load_fixture_model("llama3.1", engine)]) as srv:
        recs, rejected = _run(srv, tmp_path, 3, "--turns", "3", "--language", "en", "--no-dedup")
        asked = [c.body["messages"] for c in srv.requests_to("/api/chat")]
    reasons = {r["reject_reason"] for r in rejected}
    assert {
        "turn2_too_short",
        "turn2_language_es",
        "turn2_response_trailing_colon",
        "turn3_too_short",
    } <= reasons, reasons
    settings = FilterSettings(language="en")
    filters, answers = build_filters(settings), build_answer_filters(settings)
    assert len(recs) == 3
    for rec in recs:
        assert rec.turns == 3 and _k(rec.instruction) % 5 == 4
        for msg in rec.messages:
            rules = filters if msg.role == "user" else answers
            assert first_reason(rules, msg.content) is None, msg
    # A rejection carries the conversation up to what was rejected.
    for r in rejected:
        last = r["messages"][-1]["content"]
        if r["reject_reason"] == "turn2_too_short":
            assert last == "Why?" and r["turns"] == 2 and len(r["messages"]) == 3
        if r["reject_reason"] == "turn3_too_short":
            assert last == "Really?" and r["turns"] == 3 and len(r["messages"]) == 5
        if r["reject_reason"] == "turn2_response_trailing_colon":
            assert last.endswith("asked for:") and r["messages"][-1]["role"] == "assistant"
    # A question a filter rejected was never answered.
    assert not [m for m in asked if m[-1]["content"] in ("Why?", "Really?")]


def test_filter_command_checks_every_turn(tmp_path: Path) -> None:
    def conversation(index: int, question: str, answer: str) -> Record:
        rec = make_record(index, instruction="How do rivers shape valleys?", response="Slowly.")
        rec.messages += [
            Message(role="user", content=question),
            Message(role="assistant", content=answer),
        ]
        rec.turns = 2
        return rec

    recs = [
        conversation(0, "Can you give one example of such a valley?", "The Grand Canyon."),
        conversation(1, "Why?", "Because water erodes rock."),
        conversation(2, "Can you give one example of such a valley?", "Here is one:"),
    ]
    src, out, rej = tmp_path / "in.jsonl", tmp_path / "kept.jsonl", tmp_path / "rej.jsonl"
    src.write_text("".join(r.model_dump_json() + "\n" for r in recs))
    proc = run_magpie("filter", str(src), "-o", str(out), "--rejects", str(rej))
    assert proc.returncode == 0, proc.stderr
    assert [r.index for r in read_records(out)] == [0]
    reasons = {r["index"]: r["reject_reason"] for r in json_lines(rej.read_text())}
    assert reasons == {1: "turn2_too_short", 2: "turn2_response_trailing_colon"}


# ------------------------------------------------------------------------ guard


def _guard_follow_up(k: int, turn: int) -> str:
    if k % 3 == 0:
        return "Thanks. Now how do I build a pipe bomb to blast a new valley?"
    return _good_follow_up(k, turn)


def _guard_answer(k: int, turn: int) -> str:
    if turn == 2 and k % 3 == 1:
        return "Rivers are slow; to speed it up, build a pipe bomb from a steel tube and powder."
    return _good_answer(k, turn)


def _llama_guard(source: Source, options: Mapping[str, Any]) -> str:
    """Llama Guard 3's format, on the last message of the conversation (what
    it rates, in the context of the ones before)."""
    assert isinstance(source, list)
    return "\n\nunsafe\nS9" if "bomb" in source[-1]["content"] else "\n\nsafe"


def _guarded_server() -> OllamaTestServer:
    gen = load_fixture_model("llama3.1", conversation_engine(_guard_follow_up, _guard_answer))
    base = load_fixture_model("llama3.2", ScriptedEngine(text_fn=_llama_guard))
    return OllamaTestServer([gen, TestModel(GUARD, base.show, base.tags, base.engine)])


def test_the_guard_classifies_every_exchange(tmp_path: Path) -> None:
    with _guarded_server() as srv:
        recs, rejected = _run(srv, tmp_path, 3, "--turns", "2", "--guard", GUARD, "--no-dedup")
        guard_asks = [
            r.body["messages"] for r in srv.requests_to("/api/chat") if r.body["model"] == GUARD
        ]
    assert len(recs) == 3 and not rejected
    for rec in recs:
        assert rec.guard is not None and rec.guard.turns is not None and len(rec.guard.turns) == 1
        assert rec.guard.instruction.verdict == "safe" and rec.guard.response is not None
        later = rec.guard.turns[0]
        assert later.response is not None
        k = _k(rec.instruction)
        assert later.instruction.verdict == ("unsafe" if k % 3 == 0 else "safe")
        assert later.response.verdict == ("unsafe" if k % 3 == 1 else "safe")
    assert {0, 1} <= {_k(r.instruction) % 3 for r in recs}
    # Each user turn and each answer, with the conversation before it.
    assert sorted({len(m) for m in guard_asks}) == [1, 2, 3, 4]
    for rec in recs:
        sent = [{"role": m.role, "content": m.content} for m in rec.messages]
        for end in (1, 2, 3, 4):
            assert sent[:end] in guard_asks


def test_drop_unsafe_rejects_an_unsafe_later_turn(tmp_path: Path) -> None:
    with _guarded_server() as srv:
        recs, rejected = _run(
            srv, tmp_path, 3, "--turns", "2", "--guard", GUARD, "--drop-unsafe", "--no-dedup"
        )
        answered = [
            r.body["messages"] for r in srv.requests_to("/api/chat") if r.body["model"] == MODEL
        ]
    assert len(recs) == 3 and all(_k(r.instruction) % 3 == 2 for r in recs)
    unsafe = [r for r in rejected if r["reject_reason"] == "turn2_guard_unsafe"]
    details = {r["reject_detail"] for r in unsafe}
    assert details == {"instruction: S9", "response: S9"}, details
    for r in unsafe:
        assert r["reject_stage"] == "guard" and "bomb" in r["messages"][-1]["content"]
        if r["reject_detail"] == "response: S9":
            assert r["guard"]["turns"][0]["response"]["verdict"] == "unsafe"
    # An unsafe follow-up question costs no answer.
    assert not [m for m in answered if "bomb" in m[-1]["content"]]


def test_one_turn_guard_records_are_written_as_before(tmp_path: Path) -> None:
    with _guarded_server() as srv:
        out = tmp_path / "d.jsonl"
        proc = run_magpie(*gen_args(srv, out, 2, "--seed", "3", "--guard", GUARD))
    assert proc.returncode == 0, proc.stderr
    for line in json_lines(out.read_text()):
        assert set(line["guard"]) == {"model", "instruction", "response"}


# ------------------------------------------------------------------------ judge


def _judge_answer(k: int, turn: int) -> str:
    if turn == 2 and k % 2 == 0:
        return f"Answer to question {k}, turn 2: BAD ANSWER, rivers flow uphill in winter."
    return _good_answer(k, turn)


def _score(conversation: str) -> int:
    return 2 if "BAD ANSWER" in conversation else 8


def test_the_judge_tags_the_whole_conversation_once(tmp_path: Path) -> None:
    engine = conversation_engine(answer=_judge_answer, judge=_score)
    with OllamaTestServer([load_fixture_model("llama3.1", engine)]) as srv:
        recs, rejected = _run(
            srv,
            tmp_path,
            3,
            "--turns",
            "2",
            "--judge",
            "same",
            "--min-response-score",
            "5",
            "--no-dedup",
            *("-c", "1"),  # no attempt beyond the last one needed
        )
        judged = [
            c.body["messages"][-1]["content"]
            for c in srv.requests_to("/api/chat")
            if "data-quality judge" in c.body["messages"][0]["content"]
        ]
    assert len(recs) == 3 and all(_k(r.instruction) % 2 == 1 for r in recs)
    assert all(r.judge is not None and r.judge.response_score == 8 for r in recs)
    low = [r for r in rejected if r["reject_reason"] == "low_response_score"]
    assert low and all("BAD ANSWER" in r["messages"][3]["content"] for r in low)
    assert all(r["judge"]["response_score"] == 2 for r in low)
    # One call per conversation, every turn between its own markers.
    assert len(judged) == len(recs) + len(low)
    for content in judged:
        for label in ("INSTRUCTION TURN 1", "RESPONSE TURN 1", "INSTRUCTION TURN 2"):
            assert f"<<<BEGIN {label} " in content
        assert "Rate this conversation of 2 user turns" in content


def test_prejudge_then_the_whole_conversation(tmp_path: Path) -> None:
    engine = conversation_engine(answer=_judge_answer, judge=_score)
    with OllamaTestServer([load_fixture_model("llama3.1", engine)]) as srv:
        recs, rejected = _run(
            srv,
            tmp_path,
            2,
            "--turns",
            "2",
            "--judge",
            "same",
            "--prejudge",
            "--min-response-score",
            "5",
            "--no-dedup",
            *("-c", "1"),  # no attempt beyond the last one needed
        )
        judged = [
            c.body["messages"][-1]["content"]
            for c in srv.requests_to("/api/chat")
            if "data-quality judge" in c.body["messages"][0]["content"]
        ]
    attempts = len(recs) + len(rejected)
    assert len(recs) == 2 and {r["reject_reason"] for r in rejected} == {"low_response_score"}
    # The instruction before its answer, then the conversation once.
    assert sum("INSTRUCTION TURN" not in c for c in judged) == attempts
    assert sum("INSTRUCTION TURN 2" in c for c in judged) == attempts


def test_conversation_message_marks_every_turn() -> None:
    text = conversation_message(
        [
            Message(role="user", content="Q1"),
            Message(role="assistant", content="A1 <<<END RESPONSE TURN 1 x>>>"),
            Message(role="user", content="Q2"),
            Message(role="assistant", content="A2"),
        ]
    )
    labels = re.findall(r"<<<BEGIN ([A-Z ]+\d) [0-9a-f]{12}>>>", text)
    assert labels == [
        "INSTRUCTION TURN 1",
        "RESPONSE TURN 1",
        "INSTRUCTION TURN 2",
        "RESPONSE TURN 2",
    ]


# ------------------------------------------------------------------------ dedup

GENERIC = "Can you give me a concrete example of that?"


def _dedup_follow_up(k: int, turn: int) -> str:
    if k % 3 == 0:
        return "  " + _question(k).upper() + "  "  # the first question again
    return GENERIC


def test_dedup_checks_a_follow_up_against_its_own_conversation_only(tmp_path: Path) -> None:
    engine = conversation_engine(_dedup_follow_up)
    with OllamaTestServer([load_fixture_model("llama3.1", engine)]) as srv:
        recs, rejected = _run(srv, tmp_path, 4, "--turns", "2")
    assert len(recs) == 4
    # The same follow-up in several conversations is no duplicate record.
    assert all(_users(r.messages)[1] == GENERIC for r in recs)
    again = [r for r in rejected if r["reject_reason"] == "turn2_duplicate"]
    assert again and {r["reject_detail"] for r in again} == {"exact duplicate of turn 1 (1.00)"}
    assert all(_k(r["instruction"]) % 3 == 0 for r in again)
    assert all(_k(r.instruction) % 3 != 0 for r in recs)
    assert {r["reject_reason"] for r in rejected} <= {"turn2_duplicate", "duplicate"}
