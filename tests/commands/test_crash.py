"""SIGKILL at random points, then rerun: the output converges to exactly N
valid, unique records; a resumed embedded run equals an uninterrupted one."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from batch_helpers import assert_exact, gen_args, manifest_of, read_records, scripted_server
from magpie_cli import popen_magpie, run_magpie

KILLS = 10


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun(tmp_path: Path) -> None:
    rng = random.Random(20261129)
    out = tmp_path / "d.jsonl"
    torn_seen = interrupted = 0
    with scripted_server(latency=0.05) as srv:
        for round_ in range(1, KILLS + 1):
            target = 25 * round_
            proc = popen_magpie(*gen_args(srv, out, target, "--seed", "77"))
            time.sleep(rng.uniform(0.4, 2.0))  # start-up, mid-run, or already done
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            # Whatever the kill hit, every complete line is a valid record.
            data = out.read_bytes() if out.exists() else b""
            complete = data[: data.rfind(b"\n") + 1]
            before = len(complete.splitlines())
            assert before <= target
            interrupted += before < target
            rerun = run_magpie(*gen_args(srv, out, target, "--seed", "77"))  # the same command
            assert rerun.returncode == 0, rerun.stderr
            torn_seen += "torn last line" in rerun.stderr
            recs = assert_exact(out, target)
            assert {r.seed for r in recs} == {77}
            m = manifest_of(out)
            assert m.records == target and m.runs[-1].status == "done"
            assert all(run.status != "running" for run in m.runs)
    assert interrupted >= 5, "most kills should land before the run was done"
    torn = tmp_path / "d.jsonl.torn"
    assert torn_seen == (torn.read_bytes().count(b"\n") if torn.exists() else 0)


@pytest.mark.slow
def test_resume_is_deterministic_on_embedded(tmp_path: Path) -> None:
    """Interrupted (SIGINT after the first record) and resumed == uninterrupted."""
    small = [
        "--backend",
        "embedded",
        "--seed",
        "31",
        "--instruction-max-tokens",
        "48",
        "--response-max-tokens",
        "48",
        "--keep-truncated",
    ]
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    proc = run_magpie("generate", "-n", "3", *small, "-o", str(whole))
    assert proc.returncode == 0, proc.stderr
    first = popen_magpie("generate", "-n", "3", *small, "-o", str(parts), "--grace-period", "0")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        not parts.exists() or not parts.read_bytes().count(b"\n")
    ):
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    assert first.returncode in (0, 130)
    resumed = run_magpie("generate", "-n", "3", *small, "-o", str(parts))
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_records(whole), read_records(parts)
    assert [(r.index, r.instruction, r.response) for r in a] == [
        (r.index, r.instruction, r.response) for r in b
    ]
    assert [r.id for r in a] == [r.id for r in b]


def test_run_killed_after_its_last_record_is_settled_by_the_rerun(tmp_path: Path) -> None:
    """SIGKILL once every record is written, before the final manifest: the
    'nothing to do' rerun marks that run crashed, with what it really wrote."""
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        proc = popen_magpie(*gen_args(srv, out, 6, "--seed", "5"))
        while not (out.exists() and out.read_bytes().count(b"\n") >= 6):
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        man = manifest_of(out)
        if man.runs[-1].status != "running":  # it finished first: make it a kill
            man.runs[-1].status, man.runs[-1].written = "running", 0
            (tmp_path / "d.jsonl.manifest.json").write_text(man.model_dump_json())
        again = run_magpie(*gen_args(srv, out, 6))
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    run = manifest_of(out).runs[-1]
    assert run.status == "crashed" and run.written == 6
    assert manifest_of(out).records == 6
