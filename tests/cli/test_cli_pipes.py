"""A reader that goes away (``magpie ... | head``) is not an error: every command
that writes to stdout exits 0, quietly, when its pipe is closed under it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from magpie_cli import popen_magpie
from samples import make_record


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    with path.open("w") as fh:
        for i in range(200):
            rec = make_record(i, instruction=f"Question number {i} about topic {i * 7}?")
            fh.write(rec.model_dump_json() + "\n")
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "{data}"],
        ["stats", "{data}", "--json"],
        ["templates", "list"],
        ["templates", "show", "llama3"],
        ["export", "{data}", "--format", "sharegpt", "-o", "-"],
        ["dedup", "{data}", "-o", "-"],
        ["merge", "{data}", "-o", "-"],
    ],
    ids=lambda a: " ".join(a[:3]),
)
def test_closed_stdout_exits_zero(args: list[str], data: Path) -> None:
    proc = popen_magpie(*[a.format(data=data) for a in args])
    # Close our end before magpie writes anything (it is still importing), so
    # its first write to stdout meets a broken pipe.
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "error" not in stderr.lower()


def test_doctor_keeps_its_verdict_when_its_reader_goes_away() -> None:
    """``magpie doctor --json | head`` exits with the checks' status (3: the
    server is down), not 0: a script that reads one line still sees it."""
    from magpie.errors import ExitStatus

    proc = popen_magpie("doctor", "--json", "--host", "http://127.0.0.1:9", "--model", "m")
    assert proc.stdout is not None
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == ExitStatus.BACKEND_UNAVAILABLE, stderr
    assert "Traceback" not in stderr
