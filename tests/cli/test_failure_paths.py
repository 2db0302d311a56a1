"""Every failure is one line and a documented exit code: a full disk (a file
size limit stands in for it: the same EFBIG/ENOSPC path), stdout on /dev/full,
closed stdin and stdout, bad bytes.  The real command in a subprocess."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_helpers import assert_exact, gen_args, manifest_of, scripted_server
from magpie_cli import run_magpie
from samples import make_record


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Unclosed" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("magpie: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def limited(max_bytes: int):  # type: ignore[no-untyped-def]
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return setup


def test_full_disk_mid_run_keeps_whole_records_and_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        args = [sys.executable, "-m", "magpie", *gen_args(srv, out, 40, "--seed", "4")]
        proc = subprocess.run(
            args, capture_output=True, text=True, preexec_fn=limited(12_000), timeout=300
        )
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc.stderr)
        assert f"cannot write {out}" in line and "file size limit" in line, line
        kept = assert_exact(out, len(out.read_bytes().splitlines()))  # whole lines only
        assert 0 < len(kept) < 40 and out.read_bytes().endswith(b"\n")
        run = manifest_of(out).runs[-1]
        assert run.status == "failed" and run.exit_status == 1
        assert not list(tmp_path.glob(".*.tmp"))
        # Space again: the rerun resumes and ends at exactly N.
        again = run_magpie(*gen_args(srv, out, 40))
    assert again.returncode == 0, again.stderr
    assert_exact(out, 40)


@pytest.mark.slow
def test_stdout_on_a_full_device_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(make_record(0).model_dump_json() + "\n")
    for args in (
        ["templates", "list"],
        ["--help"],
        ["stats", str(data), "--json"],
        ["doctor", "--host", "http://127.0.0.1:9", "--backend", "ollama", "--json"],
    ):
        with open("/dev/full", "w") as full:
            proc = subprocess.run(
                [sys.executable, "-m", "magpie", *args],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert proc.returncode == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "no space left" in proc.stderr, args


@pytest.mark.slow
def test_closed_stdin_and_stdout(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(make_record(0).model_dump_json() + "\n")
    for args in (
        ["dedup", "-", "-o", str(tmp_path / "o.jsonl")],
        ["export", "-", "--format", "openai", "-o", str(tmp_path / "e.jsonl")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "magpie", *args],
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.close(0),
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "stdin is closed" in one_error_line(proc.stderr)
    for args in (
        ["export", str(data), "--format", "openai"],
        ["dedup", str(data), "-o", "-"],
        ["generate", "-n", "1", "--host", "http://127.0.0.1:9", "--model", "m", "-o", "-"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "magpie", *args],
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.close(1),
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "stdout is closed" in one_error_line(proc.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["card", "{data}"],
        ["stats", "{data}", "--json"],
        ["doctor", "--host", "http://127.0.0.1:9", "--backend", "ollama", "--json"],
        ["stats", "{data}"],
        ["templates", "list"],
        ["templates", "show", "llama3"],
        ["--version"],
    ],
    ids=[
        "card",
        "stats --json",
        "doctor --json",
        "stats",
        "templates list",
        "templates show",
        "--version",
    ],
)
def test_closed_stdout_is_one_line_for_every_command(tmp_path: Path, args: list[str]) -> None:
    """Every command's data goes to stdout through one path (cli.terminal):
    card, stats --json and doctor --json died with a traceback on a closed
    stdout, stats, templates list and --version printed nothing and exited 0."""
    data = tmp_path / "d.jsonl"
    data.write_text(make_record(0).model_dump_json() + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "magpie", *[a.format(data=data) for a in args]],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 2, (args, proc.stderr)
    assert "stdout is closed" in one_error_line(proc.stderr)


def test_export_of_bad_bytes_is_a_bad_record(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(make_record(0).model_dump_json().encode() + b"\n\xff\xfe{}\n")
    out = tmp_path / "o.jsonl"
    proc = run_magpie("export", str(bad), "--format", "openai", "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "line 2 is not a magpie record" in one_error_line(proc.stderr)
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl*"))


@pytest.mark.parametrize("what", ["output", "rejects"])
def test_fifo_targets_are_refused_not_waited_on(tmp_path: Path, what: str) -> None:
    """A FIFO named as a file target is refused up front (it would hang)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({}) + "\n")
    args = (
        ["dedup", str(data), "-o", str(fifo)]
        if what == "output"
        else ["dedup", str(data), "-o", str(tmp_path / "o.jsonl"), "--rejects", str(fifo)]
    )
    proc = run_magpie(*args, "--overwrite", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "FIFO" in one_error_line(proc.stderr)


def big_input(tmp_path: Path, n: int = 60_000) -> Path:
    line = make_record(0, instruction="What is a question worth asking?", response="A" * 400)
    text = line.model_dump_json()
    src = tmp_path / "big.jsonl"
    with src.open("w") as fh:
        for i in range(n):
            fh.write(text.replace(line.id, f"{i:016x}", 1) + "\n")
    return src


def temps(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "dedup", "merge"])
def test_killed_file_command_leaves_no_temp_file(tmp_path: Path, command: str) -> None:
    src = big_input(tmp_path)
    out = tmp_path / "o.jsonl"
    args = {
        "export": ["export", str(src), "--format", "openai", "-o", str(out)],
        "dedup": ["dedup", str(src), "-o", str(out)],
        "merge": ["merge", str(src), "-o", str(out)],
    }[command]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [sys.executable, "-m", "magpie", *args], stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not temps(tmp_path) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            pytest.skip("the command finished before the signal")  # a very fast machine
        if sig == signal.SIGTERM:
            assert proc.returncode == 143, err
            assert "Traceback" not in err
            assert temps(tmp_path) == [] and not out.exists()
        else:
            assert len(temps(tmp_path)) == 1 and not out.exists()
    # The next run of the same output removes the dead process's temp file.
    proc = run_magpie(*args)
    assert proc.returncode == 0, proc.stderr
    assert temps(tmp_path) == [] and out.exists()


def test_sigterm_inside_a_pydantic_serializer_still_ends_as_terminated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM raises Terminated wherever the command is; inside a pydantic
    serializer (``Message``'s, while an export converts a record) pydantic
    hands it on as PydanticSerializationError.  The command still exits 143
    (this race failed ``test_killed_file_command_leaves_no_temp_file[export]``)."""
    from pydantic import BaseModel, model_serializer

    from magpie.cli import terminal

    monkeypatch.setattr(terminal, "_sigterm_seen", False)

    class Serialised(BaseModel):
        @model_serializer(mode="wrap")
        def _signal_arrives_here(self, handler: object) -> dict[str, object]:
            terminal._on_sigterm(signal.SIGTERM, None)
            return {}

    with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever pydantic makes of it
        Serialised().model_dump()
    assert not isinstance(caught.value, terminal.Terminated)  # wrapped: the race's cause
    assert terminal.fail(caught.value, debug=False).exit_code == 143
