"""Nothing clobbered: every command that writes refuses a target that is one of
its inputs, another named file, not a regular file, or (without --overwrite) an
existing file; symlinks are written through.  Real files, the real command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from magpie_cli import run_magpie
from samples import make_record

from magpie.errors import UsageError
from magpie.store.targets import check_target, kind_of, refuse_same, same_file

DEAD_HOST = "http://127.0.0.1:9"  # every refusal below comes before any request


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


def refused(proc, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "Traceback" not in line and len(line.splitlines()) == 1, line
    for w in words:
        assert w in line, line


def test_names_of_one_file(tmp_path: Path, data: Path) -> None:
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(data)
    os.link(data, hard)
    assert same_file(data, link) and same_file(data, hard) and same_file(link, hard)
    assert same_file(tmp_path / "new.jsonl", tmp_path / "." / "new.jsonl")
    assert not same_file(data, tmp_path / "other.jsonl") and not same_file("-", "-")
    with pytest.raises(UsageError, match="are the same file"):
        refuse_same([("output", data), ("--rejects", hard)])
    assert kind_of(data) is None and kind_of(tmp_path / "none") is None
    assert kind_of(Path("/dev/null")) == "a character device"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert kind_of(fifo) == "a FIFO"
    with pytest.raises(UsageError, match="is a FIFO"):
        check_target(fifo, "output", overwrite=True)
    with pytest.raises(UsageError, match="exists: pass --overwrite"):
        check_target(data, "output")


def test_stats_html_never_replaces_a_dataset(tmp_path: Path, data: Path) -> None:
    before = data.read_bytes()
    refused(run_magpie("stats", str(data), "--html", str(data)), "is the input")
    refused(run_magpie("stats", str(data), "--html", str(data), "--overwrite"), "is the input")
    other = tmp_path / "other.jsonl"
    other.write_bytes(before)
    refused(run_magpie("stats", str(data), "--html", str(other)), "exists", "--overwrite")
    assert data.read_bytes() == before and other.read_bytes() == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(run_magpie("stats", str(data), "--html", str(fifo), "--overwrite"), "FIFO")
    assert kind_of(fifo) == "a FIFO"
    report = tmp_path / "r.html"
    assert run_magpie("stats", str(data), "--html", str(report)).returncode == 0
    assert report.read_text().startswith("<!DOCTYPE html>")
    assert run_magpie("stats", str(data), "--html", str(report), "--overwrite").returncode == 0


def test_generate_rejects_never_go_into_a_dataset(tmp_path: Path, data: Path) -> None:
    before = data.read_bytes()
    base = ["generate", "-n", "5", "--host", DEAD_HOST, "--model", "m"]
    refused(run_magpie(*base, "-o", str(data), "--rejects", str(data)), "same file")
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    refused(run_magpie(*base, "-o", str(data), "--rejects", str(link)), "same file")
    out = tmp_path / "new.jsonl"
    refused(run_magpie(*base, "-o", str(out), "--rejects", str(data)), "not a magpie rejects file")
    refused(
        run_magpie(*base, "-o", str(out), "--rejects", str(tmp_path / "no" / "r.jsonl")),
        "does not exist",
    )
    assert data.read_bytes() == before and not out.exists()


def test_generate_refuses_a_one_line_text_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk")  # one line, no newline: not a torn record
    proc = run_magpie("generate", "-n", "2", "--host", DEAD_HOST, "--model", "m", "-o", str(notes))
    refused(proc, "not a magpie JSONL")
    assert notes.read_text() == "remember the milk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_generate_refuses_fifo_and_device(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        proc = run_magpie(
            "generate", "-n", "2", "--host", DEAD_HOST, "--model", "m", "-o", str(target)
        )
        refused(proc, "regular files only", "stdout")
    assert kind_of(fifo) == "a FIFO" and kind_of(Path("/dev/null")) == "a character device"


def test_filter_rejects_is_neither_output_nor_input(tmp_path: Path, data: Path) -> None:
    before = data.read_bytes()
    out = tmp_path / "kept.jsonl"
    refused(run_magpie("filter", str(data), "-o", str(out), "--rejects", str(out)), "same file")
    refused(run_magpie("filter", str(data), "-o", str(out), "--rejects", str(data)), "same file")
    hard = tmp_path / "hard.jsonl"
    os.link(data, hard)
    refused(run_magpie("filter", str(data), "-o", str(hard)), "is the input")
    assert data.read_bytes() == before and not out.exists()


def test_export_never_replaces_its_input(tmp_path: Path, data: Path) -> None:
    before = data.read_bytes()
    refused(
        run_magpie("export", str(data), "--format", "openai", "-o", str(data), "--overwrite"),
        "is the input",
    )
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    refused(
        run_magpie("export", str(data), "--format", "openai", "-o", str(link), "--overwrite"),
        "is the input",
    )
    assert data.read_bytes() == before


@pytest.mark.parametrize("command", ["export", "dedup", "merge"])
def test_overwrite_writes_through_a_symlink(tmp_path: Path, data: Path, command: str) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    args = {
        "export": ["export", str(data), "--format", "openai"],
        "dedup": ["dedup", str(data)],
        "merge": ["merge", str(data)],
    }[command]
    proc = run_magpie(*args, "-o", str(link), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() != "old\n" and len(real.read_text().splitlines()) == 3
    assert oct(real.stat().st_mode & 0o777) == "0o644"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(run_magpie(*args, "-o", str(fifo), "--overwrite"), "FIFO")
    assert kind_of(fifo) == "a FIFO"


def test_dedup_and_merge_rejects_are_not_the_output(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "o.jsonl"
    hard = tmp_path / "h.jsonl"
    out.write_text("")
    os.link(out, hard)
    for cmd in ("dedup", "merge"):
        proc = run_magpie(cmd, str(data), "-o", str(out), "--rejects", str(hard), "--overwrite")
        refused(proc, "same file")


def test_two_outputs_are_never_one_stdout(tmp_path: Path) -> None:
    """``magpie dedup X -o - --rejects -`` would mix the dropped records (with
    their ``reject_reason``) into the dataset's stream: refused, as merge does."""
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        "".join(
            make_record(i, instruction="The same question?").model_dump_json() + "\n"
            for i in range(3)
        )
    )
    proc = run_magpie("dedup", str(dup), "-o", "-", "--rejects", "-")
    refused(proc, "cannot both be stdout", "--rejects")
    assert proc.stdout == ""
