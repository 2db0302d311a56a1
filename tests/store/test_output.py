"""Output files: scanning for top-up, torn lines, refusing foreign files; the
record schema round-trips through JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import make_record

from magpie.errors import UsageError
from magpie.records import (
    SCHEMA_VERSION,
    Record,
    derive_seed,
    record_id,
)
from magpie.store.jsonl import JsonlWriter, check_output_path, scan_output


def test_write_and_scan(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with JsonlWriter(out) as w:
        for i in (0, 2, 5):
            w.write(make_record(i, seed=9))
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["schema_version"] == SCHEMA_VERSION for x in lines)
    ex = scan_output(out)
    assert (ex.count, ex.next_index, ex.seed, ex.torn) == (3, 6, 9, b"")


def test_torn_last_line_is_set_aside(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with JsonlWriter(out) as w:
        w.write(make_record(0))
        w.write(make_record(1))
    whole = out.read_bytes()
    out.write_bytes(whole + make_record(2).model_dump_json().encode()[:40])
    ex = scan_output(out)
    assert ex.count == 2 and ex.torn
    w = JsonlWriter(out, existing=ex)
    torn = w.prepare()
    w.write(make_record(3))
    w.close()
    assert torn == tmp_path / "d.jsonl.torn"
    assert torn.read_bytes().startswith(b'{"schema_version"')
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1, 3]


def test_complete_last_line_without_newline_counts(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    out.write_text(make_record(0).model_dump_json() + "\n" + make_record(1).model_dump_json())
    ex = scan_output(out)
    assert ex.count == 2 and not ex.torn


@pytest.mark.parametrize(
    "content",
    [
        '{\n  "a": 1\n}\n',
        '{"a": 1}\n',
        "not json at all\n",
        "[1, 2]\n",
        "my notes, one line, no newline",  # not a torn record: never moved aside
        '{"a": 1}',
    ],
)
def test_foreign_file_is_refused(tmp_path: Path, content: str) -> None:
    out = tmp_path / "other.json"
    out.write_text(content)
    with pytest.raises(UsageError, match="not a magpie JSONL"):
        scan_output(out)
    assert out.read_text() == content


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path("-") is None
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(str(tmp_path / "no" / "d.jsonl"))


def test_overwrite_truncates_only_at_first_write(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    out.write_text(make_record(0).model_dump_json() + "\n")
    w = JsonlWriter(out, overwrite=True)
    w.close()  # nothing written: old content stays
    assert scan_output(out).count == 1
    with JsonlWriter(out, overwrite=True) as w:
        w.write(make_record(7))
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [7]


def test_seeds_are_distinct_and_stable() -> None:
    stages = ("instruction", "response", "instruction:2", "response:2")
    seeds = {derive_seed(42, i, s) for i in range(50_000) for s in stages}
    assert len(seeds) == 200_000  # a bijection: no collision, however long the run
    assert derive_seed(42, 0, "instruction") != derive_seed(43, 0, "instruction")
    assert derive_seed(42, 5, "instruction") == derive_seed(42, 5, "instruction")
    assert all(0 <= s < 2**31 for s in seeds)
    assert record_id("m", "t", 1, 2) != record_id("m", "t", 1, 3)


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=60, deadline=None)
@given(instruction=text, response=text, index=st.integers(0, 10**9), seed=st.integers(0, 2**62))
def test_record_round_trips_through_jsonl(
    instruction: str, response: str, index: int, seed: int
) -> None:
    rec = make_record(index, seed, instruction, response)
    line = rec.model_dump_json()
    assert "\n" not in line  # one record, one line, whatever the text holds
    back = Record.model_validate_json(line)
    assert back == rec
