"""``magpie.commands.stats``: a known file, manifest and rejects file give the known numbers;
the JSON, Rich and HTML renderers show them."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from samples import make_record

from magpie.commands.stats import (
    DataStats,
    compute_stats,
    render_html,
    render_rich,
    to_json,
    write_html,
)
from magpie.commands.stats.compute import NOT_JUDGED, histogram, percentile
from magpie.errors import UsageError
from magpie.store.manifest import Manifest, RunEntry, write_manifest

#: (instruction, response): lengths in chars/words are asserted literally below.
PAIRS = [
    ("Tell me a joke.", "Why did the chicken cross the road?"),  # 15/4, 35/7
    ("tell me  a JOKE.", "No."),  # 16/4, 3/1 (same instruction, normalized)
    ("Explain recursion.", "A function that calls itself."),  # 18/2, 29/5
    ("Write a haiku about the sea.", "Waves fold into foam"),  # 28/6, 20/4
    ("Sort a list in Python.", "Use sorted(xs) or xs.sort()."),  # 22/5, 28/4
]
JUDGES = [
    {"input_quality": "good", "difficulty": "easy", "task_category": "Creative writing",
     "other_categories": ["Brainstorming"], "response_score": 8},
    {"input_quality": "poor", "difficulty": "very easy", "task_category": "Creative writing",
     "response_score": 3},
    {"input_quality": "good", "difficulty": "medium", "task_category": "Information seeking",
     "other_categories": ["Reasoning"], "response_score": 9},
    {"input_quality": "excellent", "difficulty": "medium", "task_category": "Creative writing",
     "response_score": 8},
    None,  # the last record was not judged
]  # fmt: skip
#: Tokens of every record: instruction 10 + 6, response 20 + 30.
TOKENS = {"instruction": (10, 6), "response": (20, 30)}
PER_RECORD = 66


def _record(index: int, instruction: str, response: str, judge: Any = None) -> dict[str, Any]:
    data = make_record(index, instruction=instruction, response=response).model_dump(mode="json")
    for stage, (prompt, completion) in TOKENS.items():
        data[f"{stage}_generation"].update(prompt_tokens=prompt, completion_tokens=completion)
    judge_fields = {"safety": "safe", "language": "en", "judge_model": "llama3.1:8b"}
    if judge is not None:
        data["judge"] = {**judge_fields, **judge}
    return data


def _write_lines(path: Path, objs: list[Any]) -> Path:
    path.write_text("".join(o if isinstance(o, str) else json.dumps(o) + "\n" for o in objs))
    return path


def _manifest(path: Path) -> None:
    runs = [
        RunEntry(
            started_at="2025-03-01T10:00:00+00:00",
            ended_at="2025-03-01T10:00:10+00:00",
            pid=1,
            requested=3,
            existing_before=0,
            start_index=0,
            next_index=6,
            written=3,
            rejected={"empty": 2, "duplicate": 1},
            retries={"http_503": 1},
            prompt_tokens=300,
            completion_tokens=200,
            status="done",
            exit_status=0,
        ),
        RunEntry(
            started_at="2025-03-02T09:00:00Z",
            ended_at="2025-03-02T09:00:04Z",
            pid=2,
            requested=5,
            existing_before=3,
            start_index=6,
            next_index=9,
            written=2,
            rejected={"truncated": 1},
            prompt_tokens=100,
            completion_tokens=100,
            status="done",
            exit_status=0,
        ),
    ]
    manifest = Manifest(
        output=path.name,
        magpie_version="0.1.0",
        backend="ollama",
        host="http://127.0.0.1:11434",
        model="m",
        template={"name": "chatml", "text": "<|im_start|>user\n"},
        settings={},
        seed=1,
        records=5,
        runs=runs,
    )
    write_manifest(path, manifest)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    recs = []
    for i, ((inst, resp), judge) in enumerate(zip(PAIRS, JUDGES, strict=True)):
        rec = _record(i, inst, resp, judge)
        if i == 4:  # a two-turn conversation
            rec["messages"] += [
                {"role": "user", "content": "And in reverse?"},
                {"role": "assistant", "content": "Pass reverse=True."},
            ]
        recs.append(rec)
    path = _write_lines(tmp_path / "data.jsonl", recs)
    _manifest(path)
    return path


@pytest.fixture()
def rejects(tmp_path: Path) -> Path:
    dup = _record(7, "Tell me a joke!", "Why did the chicken cross the road?")
    dup |= {"reject_reason": "duplicate", "duplicate_of": dup["id"]}
    return _write_lines(
        tmp_path / "data.rejects.jsonl",
        [
            {"index": 5, "reason": "empty", "stage": "instruction", "reject_reason": "empty"},
            dup,
            "\n",
            {"index": 9, "reason": "low_quality", "reject_reason": "low_quality"},
            "not json\n",
        ],
    )


def test_known_numbers(data: Path, rejects: Path) -> None:
    s = compute_stats(data, rejects=rejects)
    assert (s.records, s.kept, s.invalid_lines, s.duplicate_ids) == (5, 5, 0, 0)
    # Rejections: per reason the larger of manifest and rejects file.
    assert s.rejected_manifest == {"empty": 2, "duplicate": 1, "truncated": 1}
    assert s.rejected_file == {"empty": 1, "duplicate": 1, "low_quality": 1}
    assert s.rejected == {"empty": 2, "duplicate": 1, "low_quality": 1, "truncated": 1}
    assert (s.rejected_total, s.keep_rate, s.duplicates_rejected) == (5, 0.5, 1)
    assert s.rejects_invalid_lines == 1
    # "Tell me a joke." and "tell me  a JOKE." are the same instruction.
    assert (s.unique_instructions, s.unique_share, s.duplicate_instructions) == (4, 0.8, 1)
    assert s.turns == {1: 4, 2: 1}
    assert (s.models, s.templates, s.backends) == ({"m": 5}, {"chatml": 5}, {"embedded": 5})


def test_length_distributions(data: Path) -> None:
    s = compute_stats(data)
    ic, iw = s.instruction_length.chars, s.instruction_length.words
    rc, rw = s.response_length.chars, s.response_length.words
    # chars 15 16 18 22 28: nearest rank p50 = 3rd, p90 = 5th value.
    assert (ic.count, ic.min, ic.p50, ic.p90, ic.max, ic.mean) == (5, 15, 18, 28, 28, 19.8)
    assert (iw.min, iw.p50, iw.p90, iw.max, iw.mean) == (2, 4, 6, 6, 4.2)
    assert (rc.min, rc.p50, rc.p90, rc.max, rc.mean) == (3, 28, 35, 35, 23.0)
    assert (rw.min, rw.p50, rw.p90, rw.max, rw.mean) == (1, 4, 7, 7, 4.2)
    # 15..28 spans 14 values: width 2 from 14; 3..35 spans 33: width 5 from 0.
    assert [(b.lo, b.hi, b.count) for b in ic.buckets] == [
        (14, 16, 1), (16, 18, 1), (18, 20, 1), (20, 22, 0),
        (22, 24, 1), (24, 26, 0), (26, 28, 0), (28, 30, 1),
    ]  # fmt: skip
    assert [(b.lo, b.count) for b in iw.buckets] == [(2, 1), (3, 0), (4, 2), (5, 1), (6, 1)]
    assert [b.count for b in rc.buckets] == [1, 0, 0, 0, 1, 2, 0, 1]
    assert rc.buckets[0].lo == 0 and rc.buckets[-1].hi == 40


def test_judge_distributions(data: Path) -> None:
    j = compute_stats(data).judge
    assert (j.status, j.judged, j.not_judged) == ("judged 4 of 5", 4, 1)
    assert j.input_quality == {"very poor": 0, "poor": 1, "average": 0, "good": 2, "excellent": 1}
    assert j.difficulty == {"very easy": 1, "easy": 1, "medium": 2, "hard": 0, "very hard": 0}
    assert list(j.task_categories.items())[:3] == [
        ("Creative writing", 3),
        ("Information seeking", 1),
        ("Advice seeking", 0),
    ]
    assert len(j.task_categories) == 12 and sum(j.task_categories.values()) == 4
    assert j.other_categories == {"Brainstorming": 1, "Reasoning": 1}
    assert j.response_scores == {k: {3: 1, 8: 2, 9: 1}.get(k, 0) for k in range(1, 11)}
    assert (j.response_status, j.response_scored, j.response_score_mean) == (
        "judged 4 of 5",
        4,
        7.0,
    )
    assert (j.safety, j.languages, j.judge_models) == ({"safe": 4}, {"en": 4}, {"llama3.1:8b": 4})


def test_tokens_and_throughput(data: Path, rejects: Path) -> None:
    s = compute_stats(data, rejects=rejects)
    t = s.tokens
    assert (t.records_prompt, t.records_completion, t.records_total) == (150, 180, 330)
    assert t.records_counted == 5
    # The manifest runs spent 700 tokens in all; 330 of them are in the records.
    assert (t.rejected_work, t.rejected_work_source, t.total) == (370, "manifest", 700)
    assert (t.per_kept_pair, t.per_kept_pair_records_only) == (140.0, PER_RECORD)
    tp = s.throughput
    assert tp is not None
    assert [(r.written, r.wall_s, r.records_per_s) for r in tp.runs] == [
        (3, 10.0, 0.3),
        (2, 4.0, 0.5),
    ]
    assert [(r.attempts, r.retries, r.tokens) for r in tp.runs] == [(6, 1, 500), (3, 0, 200)]
    assert (tp.written, tp.wall_s, tp.records_per_s) == (5, 14.0, round(5 / 14, 4))
    assert s.manifest is not None
    assert (s.manifest.model, s.manifest.template, s.manifest.records) == ("m", "chatml", 5)


def test_without_manifest_rejected_work_comes_from_the_rejects_file(
    data: Path, rejects: Path
) -> None:
    Path(f"{data}.manifest.json").unlink()
    s = compute_stats(data, rejects=rejects)
    assert s.manifest is None and s.throughput is None and s.rejected_manifest is None
    assert s.rejected == {"duplicate": 1, "empty": 1, "low_quality": 1}
    # Only the rejected duplicate carries token counts: 66.
    assert (s.tokens.rejected_work, s.tokens.rejected_work_source) == (66, "rejects file")
    assert s.tokens.per_kept_pair == (330 + 66) / 5


def test_not_judged_and_no_tokens(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    _write_lines(path, [make_record(i).model_dump(mode="json") for i in range(3)])
    s = compute_stats(path)
    assert (s.judge.status, s.judge.response_status) == (NOT_JUDGED, NOT_JUDGED)
    assert s.judge.input_quality == {} and s.judge.response_scores == {}
    assert s.tokens.per_kept_pair is None and s.tokens.rejected_work is None
    assert (s.rejected, s.keep_rate, s.unique_share) == ({}, 1.0, round(1 / 3, 4))
    out = io.StringIO()
    render_rich(s, Console(file=out, width=120))
    assert NOT_JUDGED in out.getvalue()
    assert NOT_JUDGED in render_html(s)


def test_torn_line_is_counted_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    whole = make_record(0).model_dump_json() + "\n"
    path.write_text(whole + whole[:30])
    s = compute_stats(path)
    assert (s.records, s.invalid_lines) == (1, 1)
    foreign = _write_lines(tmp_path / "f.jsonl", [{"messages": []}, {"a": 1}])
    with pytest.raises(UsageError, match="not a magpie JSONL"):
        compute_stats(foreign)
    with pytest.raises(UsageError, match="not found"):
        compute_stats(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="not found"):
        compute_stats(path, rejects=tmp_path / "missing.rejects.jsonl")


def test_stdin(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.read_bytes())))
    s = compute_stats(Path("-"))
    assert s.records == 5 and s.manifest is None and s.instruction_length.chars.p90 == 28


def test_json_round_trips(data: Path, rejects: Path) -> None:
    s = compute_stats(data, rejects=rejects)
    text = to_json(s)
    assert DataStats.model_validate_json(text) == s
    raw = json.loads(text)
    assert raw["tokens"]["per_kept_pair"] == 140.0
    assert raw["instruction_length"]["chars"]["p90"] == 28
    assert raw["judge"]["response_scores"]["8"] == 2


def test_html_is_self_contained(data: Path, rejects: Path, tmp_path: Path) -> None:
    s = compute_stats(data, rejects=rejects)
    out = tmp_path / "report.html"
    write_html(s, out)
    text = out.read_text("utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert text.count("<svg") >= 10  # 4 length histograms, judge charts, runs, counts
    for ref in ("<script", "<link", "<img", "<iframe", "@import", "url("):
        assert ref not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", text)
    for number in ("140.0", "50.0%", "80.0%", "0.357", "19.8", "4.2", "Creative writing"):
        assert number in text, number
    assert "<td>instruction chars</td><td>15</td><td>18</td><td>28</td><td>28</td>" in text
    assert "judged 4 of 5" in text and "low_quality" in text
    assert ">03-01 10:00</text>" in text and ">03-02 09:00</text>" in text  # runs over time
    assert "2025-03-01T10:00:00+00:00" in text
    assert not list(tmp_path.glob(".report.html.*")), "temporary file left behind"


def test_html_escapes_text(tmp_path: Path) -> None:
    rec = make_record(0).model_dump(mode="json")
    rec["model"] = "<b>evil</b>"
    path = _write_lines(tmp_path / "e.jsonl", [rec])
    text = render_html(compute_stats(path))
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;" in text


def test_rich_shows_the_numbers(data: Path, rejects: Path) -> None:
    out = io.StringIO()
    render_rich(compute_stats(data, rejects=rejects), Console(file=out, width=140))
    text = out.getvalue()
    for needle in (
        "4 (80.0%)",
        "50.0%",
        "140.0",
        "0.357",
        "low_quality",
        "Creative writing",
        "judged 4 of 5",
        "mean 7.00",
        "2025-03-01T10:00:00+00:00",
        "chatml",
    ):
        assert needle in text, needle
    assert re.search(
        r"instruction\s*│\s*chars\s*│\s*15\s*│\s*18\s*│\s*28\s*│\s*28\s*│\s*19\.8", text
    )


@given(st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=200))
def test_percentile_and_histogram_agree_with_a_sorted_list(values: list[int]) -> None:
    from collections import Counter

    counts = Counter(values)
    ordered = sorted(values)
    for p in (50, 90):
        # The smallest value with at least p % of the values at or below it.
        expected = min(v for v in ordered if sum(x <= v for x in ordered) * 100 >= p * len(ordered))
        assert percentile(counts, p) == expected
    buckets = histogram(counts)
    assert sum(b.count for b in buckets) == len(values)
    assert buckets[0].lo <= min(values) and buckets[-1].hi > max(values)
    assert len({b.hi - b.lo for b in buckets}) == 1 and len(buckets) <= 25
    for b in buckets:
        assert b.count == sum(1 for v in values if b.lo <= v < b.hi)


def test_a_generated_file_and_its_manifest(tmp_path: Path) -> None:
    """Stats of what ``generate`` really writes: two runs (a top-up) on one file."""
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    from magpie.commands.generate import generate
    from magpie.settings import RunConfig

    out = tmp_path / "gen.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine())) as srv:
        for num in (12, 20):
            generate(RunConfig(num=num, output=str(out), model="llama3.1:8b", host=srv.url))
    s = compute_stats(out)
    assert (s.records, s.invalid_lines, s.rejected_total, s.keep_rate) == (20, 0, 0, 1.0)
    assert s.manifest is not None and s.manifest.records == 20
    assert s.throughput is not None
    assert [(r.written, r.existing_before, r.status) for r in s.throughput.runs] == [
        (12, 0, "done"),
        (8, 12, "done"),
    ]
    # Nothing was rejected: the manifest's tokens are exactly the records' tokens.
    spent = sum(r.tokens for r in s.throughput.runs)
    assert s.tokens.records_total == spent > 0 and s.tokens.rejected_work == 0
    assert s.tokens.per_kept_pair == round(spent / 20, 3)
    assert (s.models, s.templates, s.backends) == (
        {"llama3.1:8b": 20},
        {"llama3": 20},
        {"ollama": 20},
    )
    assert s.judge.status == NOT_JUDGED and s.turns == {1: 20}


def test_unreadable_manifest_and_bad_rejects_lines_are_said(data: Path, rejects: Path) -> None:
    from magpie_cli import run_magpie

    assert compute_stats(data, rejects=rejects).notes == [
        f"1 lines of {rejects} are not magpie rejects: not counted"
    ]
    Path(f"{data}.manifest.json").write_text("{torn")
    s = compute_stats(data)
    assert s.manifest is None and "manifest data.jsonl.manifest.json is unreadable" in s.notes[0]
    proc = run_magpie("stats", str(data), "--json")
    assert proc.returncode == 0 and "magpie: note: its manifest" in proc.stderr
    assert json.loads(proc.stdout)["records"] == 5  # stdout stays data


def test_tokens_of_every_turn_are_the_records_tokens(tmp_path: Path) -> None:
    """A ``--turns 3`` run: the records' tokens count every stage of every turn
    (turn_generations too), so that nothing rejected means no rejected work."""
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    from magpie.commands.generate import generate
    from magpie.settings import RunConfig

    out = tmp_path / "gen.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine())) as srv:
        generate(RunConfig(num=6, turns=3, output=str(out), model="llama3.1:8b", host=srv.url))
    s = compute_stats(out)
    assert s.turns == {3: 6} and s.rejected_total == 0
    spent = sum(r.tokens for r in s.throughput.runs)  # type: ignore[union-attr]
    assert s.tokens.records_total == spent > 0 and s.tokens.rejected_work == 0
