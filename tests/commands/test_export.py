"""magpie export: the three formats, errors, and no half-written output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from samples import make_record

from magpie.commands.export import export_file
from magpie.errors import UsageError


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
    from magpie.records import Message

    recs = []
    for i, scores in enumerate([(5, 2), (3, 3), None]):
        rec = make_record(i, instruction=f"Q{i}?", response=f"A{i}.")
        if scores:
            user = Message(role="user", content=f"Q{i}?")
            rec.chosen = [user, Message(role="assistant", content="good")]
            rec.rejected = [user, Message(role="assistant", content="bad")]
            rec.score_chosen, rec.score_rejected = scores
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


def _version_1_lines(n: int) -> str:
    """Lines as schema 1 wrote them: a ``{"content", "score"}`` pair, or nulls."""
    lines = []
    for i in range(n):
        row = json.loads(
            make_record(i, instruction=f"Q{i}?", response=f"best {i}").model_dump_json()
        )
        row["schema_version"] = 1
        paired = i % 2 == 0
        row["responses"] = [f"best {i}", f"worst {i}"] if paired else None
        row["chosen"] = {"content": f"best {i}", "score": 7} if paired else None
        row["rejected"] = {"content": f"worst {i}", "score": 2} if paired else None
        lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def test_version_1_records_are_read_and_written_as_version_2(tmp_path: Path) -> None:
    from magpie.commands.merge import merge_files
    from magpie.commands.stats import compute_stats
    from magpie.records import SCHEMA_VERSION, Record

    old = tmp_path / "v1.jsonl"
    old.write_text(_version_1_lines(4))
    recs = [Record.model_validate_json(line) for line in old.read_text().splitlines()]
    assert SCHEMA_VERSION == 2 and all(r.schema_version == 2 for r in recs)
    assert recs[0].chosen is not None and recs[0].chosen[-1].content == "best 0"
    assert [m.content for m in recs[0].rejected or []] == ["Q0?", "worst 0"]
    assert (recs[0].score_chosen, recs[0].score_rejected) == (7, 2)
    assert recs[1].preference() is None
    written = json.loads(recs[1].model_dump_json())
    assert not {"chosen", "rejected", "score_chosen", "score_rejected"} & set(written)
    out = tmp_path / "dpo.jsonl"
    count = export_file(str(old), "dpo", str(out))
    assert count == 2 and dict(count.skipped) == {"no_pair": 2}
    assert read(out)[0] == {
        "prompt": [{"role": "user", "content": "Q0?"}],
        "chosen": [{"role": "assistant", "content": "best 0"}],
        "rejected": [{"role": "assistant", "content": "worst 0"}],
        "score_chosen": 7,
        "score_rejected": 2,
    }
    # merge reads them (and copies their lines as they are); stats counts them.
    merged = tmp_path / "merged.jsonl"
    merge_files([old], merged, dedup=False)
    assert merged.read_text() == old.read_text()
    assert compute_stats(old).kept == 4
