"""magpie export: the three formats, errors, and no half-written output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magpie.commands.export import export_file
from magpie.errors import UsageError
from test_output import make_record


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text(
        "".join(
            make_record(i, instruction=f"Q{i}?", response=f"A{i}.").model_dump_json() + "\n"
            for i in range(3)
        )
    )
    return p


def read(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_openai(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    assert export_file(str(data), "openai", str(out)) == 3
    assert read(out)[1] == {
        "messages": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    }


def test_sharegpt(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    export_file(str(data), "sharegpt", str(out))
    assert read(out)[0] == {
        "conversations": [{"from": "human", "value": "Q0?"}, {"from": "gpt", "value": "A0."}]
    }


def test_alpaca(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    export_file(str(data), "alpaca", str(out))
    assert read(out)[2] == {"instruction": "Q2?", "input": "", "output": "A2.", "history": []}


def test_refuses_to_overwrite_and_bad_format(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(UsageError, match="exists"):
        export_file(str(data), "openai", str(out))
    assert out.read_text() == "keep me\n"
    with pytest.raises(UsageError, match="unknown export format"):
        export_file(str(data), "parquet", str(tmp_path / "x.jsonl"))


def test_bad_input_leaves_no_output(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"not": "a record"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(UsageError, match="line 4"):
        export_file(str(bad), "openai", str(out))
    assert not out.exists()
    assert list(tmp_path.glob(".o.jsonl*")) == []


def test_dpo_skips_are_counted_and_explained(tmp_path: Path) -> None:
    from magpie.records import Scored

    recs = []
    for i, scores in enumerate([(5, 2), (3, 3), None]):
        rec = make_record(i, instruction=f"Q{i}?", response=f"A{i}.")
        if scores:
            rec.chosen = Scored(content="good", score=scores[0])
            rec.rejected = Scored(content="bad", score=scores[1])
        recs.append(rec)
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(r.model_dump_json() + "\n" for r in recs))
    out = tmp_path / "dpo.jsonl"
    count = export_file(str(src), "dpo", str(out))
    assert count == 1 and dict(count.skipped) == {"tie": 1, "no_pair": 1}
    why = count.explain("dpo")
    assert why is not None and "1 ties" in why and "1 without a pair" in why
    assert "--responses 4" in why
    assert len(read(out)) == 1 and read(out)[0]["score_chosen"] == 5
