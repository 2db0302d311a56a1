"""The one reader of record files (``magpie.store.jsonl``)."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
from samples import make_record

from magpie.errors import UsageError
from magpie.records import SCHEMA_VERSION
from magpie.store.dataset import Dataset, sidecar
from magpie.store.jsonl import (
    RecordReader,
    read_objects,
    read_records,
    record_error,
    scan_output,
)


def _line(i: int) -> bytes:
    return (make_record(i).model_dump_json() + "\n").encode()


def _unchanged(path: Path) -> tuple[bytes, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


def test_records_come_with_their_line_number_and_bytes(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    second = _line(1)
    data.write_bytes(_line(0) + b"\n  \n" + second)
    lines = list(RecordReader(data))
    assert [(x.lineno, x.record.index) for x in lines] == [(1, 0), (4, 1)]
    assert lines[1].raw == second


def test_a_torn_last_line_stops_the_reader_or_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    torn = _line(2)[:40]
    whole = _line(0) + _line(1)
    data.write_bytes(whole + torn)
    before = _unchanged(data)
    reader = RecordReader(data, torn="stop")
    assert [r.record.index for r in reader] == [0, 1]
    assert reader.torn == torn and reader.records == 2
    assert reader.good_bytes == len(whole)
    with pytest.raises(UsageError, match=r"line 3, an incomplete last line"):
        list(RecordReader(data, then="nothing written"))
    assert _unchanged(data) == before  # reading never changes the file


def test_a_whole_record_without_its_newline_is_read(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(_line(0) + _line(1).rstrip(b"\n"))
    for policy in ("stop", "error"):
        reader = RecordReader(data, torn=policy)  # type: ignore[arg-type]
        assert [r.record.index for r in reader] == [0, 1]
        assert reader.torn == b"" and reader.good_bytes == data.stat().st_size


def test_a_torn_first_line_of_something_else_is_refused(tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_bytes(b"remember the milk")
    with pytest.raises(UsageError, match="not a magpie JSONL"):
        list(RecordReader(note, torn="stop", then="refusing to touch it"))
    assert note.read_bytes() == b"remember the milk"


def test_a_bad_middle_line_names_the_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(_line(0) + b'{"id": "x"}\n' + _line(1))
    for policy in ("stop", "error"):
        with pytest.raises(UsageError) as err:
            list(RecordReader(data, torn=policy, then="nothing written"))  # type: ignore[arg-type]
        assert str(err.value).startswith(f"{data} is not a magpie JSONL (line 2: ")
        assert str(err.value).endswith("); nothing written")
    with pytest.raises(UsageError, match=r"d\.jsonl line 2 is not a magpie record \("):
        list(read_records(data))


def test_bad_bytes_are_a_bad_record_not_a_crash(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(_line(0) + b"\xff\xfe{}\n")
    with pytest.raises(UsageError, match="line 2 is not a magpie record"):
        list(read_records(data, "stdin"))


def test_a_version_1_record_is_upgraded() -> None:
    old = make_record(0).model_dump(mode="json")
    old["schema_version"] = 1
    old["chosen"] = {"content": "good", "score": 9}
    old["rejected"] = {"content": "bad", "score": 2}
    (rec,) = read_records([json.dumps(old).encode() + b"\n"], "v1.jsonl")
    assert rec.schema_version == SCHEMA_VERSION
    assert rec.chosen is not None and rec.chosen[-1].content == "good"
    assert (rec.score_chosen, rec.score_rejected) == (9, 2)


def test_the_reader_streams_never_reading_the_file_whole() -> None:
    pulled = 0

    def endless() -> Iterator[bytes]:
        nonlocal pulled
        i = 0
        while True:  # a file that never ends: reading it whole would never return
            pulled += 1
            yield _line(i)
            i += 1

    assert inspect.isgenerator(iter(RecordReader(endless())))
    assert inspect.isgenerator(read_records(endless()))
    first = list(islice(read_records(endless()), 3))
    assert [r.index for r in first] == [0, 1, 2] and pulled <= 4


def test_the_reader_opens_nothing_before_it_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    records = read_records(missing)  # no error yet: nothing was read
    with pytest.raises(UsageError, match="file not found"):
        next(records)
    with pytest.raises(UsageError, match="is a directory"):
        next(read_records(tmp_path))


def test_objects_are_read_leniently(tmp_path: Path) -> None:
    rejects = tmp_path / "r.jsonl"
    rejects.write_bytes(b'{"reject_reason": "short"}\n\nnot json\n[1]\n{"id": "a"}')
    assert list(read_objects(rejects)) == [{"reject_reason": "short"}, None, None, {"id": "a"}]


def test_the_error_is_worded_in_one_place() -> None:
    exc = ValueError("Expecting value: line 1 column 1 (char 0)\nmore")
    assert str(record_error("a.jsonl", 3, exc, then="nothing written")) == (
        "a.jsonl is not a magpie JSONL (line 3: Expecting value: line 1 column 1 (char 0)); "
        "nothing written"
    )
    assert str(record_error("stdin", 2, exc)) == (
        "stdin line 2 is not a magpie record (Expecting value: line 1 column 1 (char 0))"
    )


def test_scan_output_counts_and_sets_nothing_aside_itself(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(_line(0) + _line(0) + b"\n" + _line(3)[:10])
    before = _unchanged(data)
    ex = scan_output(data)
    assert (ex.count, ex.duplicates, ex.next_index) == (1, 1, 1)
    assert ex.torn == _line(3)[:10] and ex.good_bytes == len(_line(0)) * 2 + 1
    assert _unchanged(data) == before
    assert not Dataset(data).torn.exists()


def test_sidecars_are_named_in_one_place(tmp_path: Path) -> None:
    from magpie.pipeline.stages.dedup.cache import cache_path
    from magpie.store.manifest import manifest_path

    ds = Dataset(tmp_path / "d.jsonl")
    assert ds.manifest == manifest_path(ds.path) == tmp_path / "d.jsonl.manifest.json"
    assert ds.corrupt_manifest == tmp_path / "d.jsonl.manifest.json.corrupt"
    # cache.py still names its suffix itself (another floor's file): they agree
    assert ds.dedup_index == cache_path(ds.path) == tmp_path / "d.jsonl.dedup.npz"
    assert ds.torn == sidecar(ds.path, ".torn")
    assert set(ds.sidecars()) == {"manifest", "corrupt_manifest", "dedup_index", "torn"}
    assert os.fspath(ds.path).endswith("d.jsonl")
