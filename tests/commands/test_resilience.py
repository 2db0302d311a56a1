"""Faults injected through the Ollama-protocol test server: every run ends with
exactly N valid, unique records, and the manifest counts the retries by cause."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from batch_helpers import assert_exact, gen_args, manifest_of, scripted_server, wait_for_lines
from magpie_cli import popen_magpie, run_magpie
from ollama_server import BUSY, Delay, DropConnection, EmptyResponse, HttpError, MidStreamError

from magpie.store.lock import OutputLock, OutputLocked


@pytest.mark.parametrize(
    ("fault", "times", "path", "cause", "extra"),
    [
        (HttpError(503, BUSY), 6, "/api/generate", "http_503", []),
        (HttpError(429, "too many requests"), 3, "/api/chat", "http_429", []),
        (HttpError(500, "model runner has unexpectedly stopped"), 3, None, "http_500", []),
        (Delay(3.0), 2, "/api/generate", "timeout", ["--timeout", "0.5"]),
        (EmptyResponse(), 4, "/api/generate", "empty", []),
        (MidStreamError("llama runner process has terminated"), 3, None, "stream_error", []),
        (DropConnection(), 3, None, "connection", []),
    ],
    ids=["503-burst", "429", "500", "timeout", "empty", "mid-stream-error", "dropped-connection"],
)
def test_fault_is_retried_and_run_completes(
    tmp_path: Path, fault, times, path, cause, extra
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        srv.inject(fault, times=times, path=path)
        proc = run_magpie(*gen_args(srv, out, 8, "--seed", "3", *extra))
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 8)
    run = manifest_of(out).runs[-1]
    assert run.retries.get(cause) == times, run.retries
    assert run.status == "done" and run.exit_status == 0
    assert "retries" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_server_stopped_and_restarted_mid_run(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server(latency=0.05) as srv:
        proc = popen_magpie(*gen_args(srv, out, 30, "--seed", "8"))
        wait_for_lines(out, 5)
        srv.stop()
        time.sleep(1.5)
        srv.start()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_exact(out, 30)
    assert manifest_of(out).runs[-1].retries.get("unreachable", 0) >= 1


@pytest.mark.slow
def test_backend_gone_beyond_budget_exits_3_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server(latency=0.05) as srv:
        proc = popen_magpie(*gen_args(srv, out, 30, "--seed", "2", "--unreachable-budget", "1"))
        wait_for_lines(out, 3)
        srv.stop()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        assert "ollama serve" in err and "written" in err  # the error line and the summary
        kept = len(assert_exact(out, len(out.read_bytes().splitlines())))
        assert 3 <= kept < 30
        run = manifest_of(out).runs[-1]
        assert run.status == "failed" and run.exit_status == 3
        srv.start()
        proc2 = run_magpie(*gen_args(srv, out, 30))
    assert proc2.returncode == 0, proc2.stderr
    recs = assert_exact(out, 30)
    assert {r.seed for r in recs} == {2}


def test_retries_exhausted_exit_1_file_valid(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 2, "--seed", "1")).returncode == 0
        srv.inject(HttpError(500, "boom"), times=None, path="/api/chat")
        proc = run_magpie(*gen_args(srv, out, 6, "--max-retries", "2"))
    assert proc.returncode == 1, proc.stderr
    assert "500" in proc.stderr and "Traceback" not in proc.stderr
    assert_exact(out, 2)
    run = manifest_of(out).runs[-1]
    assert run.status == "failed" and run.exit_status == 1 and run.error


def test_a_pair_that_runs_out_of_retries_is_a_rejection(tmp_path: Path) -> None:
    """One request failing past --max-retries costs its pair, not the run."""
    out, rej = tmp_path / "d.jsonl", tmp_path / "rej.jsonl"
    with scripted_server() as srv:
        srv.inject(HttpError(503, "busy"), times=3, path="/api/chat")
        proc = run_magpie(
            *gen_args(
                srv, out, 4, "--max-retries", "2", "--concurrency", "1", "--rejects", str(rej)
            )
        )
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 4)
    run = manifest_of(out).runs[-1]
    assert run.rejected == {"failed_http_503": 1} and run.retries == {"http_503": 2}
    rejected = [json.loads(line) for line in rej.read_text().splitlines()]
    assert rejected[0]["reject_reason"] == "failed_http_503"
    assert "503" in rejected[0]["reject_detail"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "status"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_signal_stops_cleanly(tmp_path: Path, sig: int, code: int, status: str) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server(latency=0.1) as srv:
        proc = popen_magpie(*gen_args(srv, out, 200, "--seed", "4", "--grace-period", "5"))
        wait_for_lines(out, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    recs = assert_exact(out, len(out.read_bytes().splitlines()))
    assert 3 <= len(recs) < 200
    assert f"{len(recs)} written" in err.splitlines()[-1]
    run = manifest_of(out).runs[-1]
    assert run.status == status and run.exit_status == code and run.written == len(recs)
    assert manifest_of(out).records == len(recs)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_file_valid(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server(latency=2.0) as srv:
        proc = popen_magpie(
            *gen_args(srv, out, 50, "--seed", "4", "--grace-period", "60", "-c", "2")
        )
        wait_for_lines(out, 1, timeout=30)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        quick = time.monotonic() - started
    assert proc.returncode == 130
    assert quick < 30  # it did not wait out the 60 s grace period
    assert_exact(out, len(out.read_bytes().splitlines()))


def test_lock_second_run_refuses(tmp_path: Path) -> None:
    """A held lock refuses a second run by any name of the file; no race: the
    test itself holds the lock a running generate would hold."""
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 3, "--seed", "6")).returncode == 0
        before = out.read_bytes()
        man = tmp_path / "d.jsonl.manifest.json"
        snapshot = man.read_bytes()
        link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
        link.symlink_to(out)
        os.link(out, hard)
        with OutputLock(out):
            for name in (out, link, hard, Path(os.path.relpath(out))):
                second = run_magpie(*gen_args(srv, name, 6, "--overwrite"))
                assert second.returncode == 4, second.stderr
                assert "another magpie run is writing" in second.stderr
                assert second.stdout == ""
    assert out.read_bytes() == before and man.read_bytes() == snapshot
    assert not list(tmp_path.glob("*.lock"))


@pytest.mark.slow
def test_running_generate_holds_the_lock_on_every_name(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    hard = tmp_path / "hard.jsonl"
    with scripted_server() as srv:
        srv.inject(Delay(0.5), times=30, path="/api/chat")  # >= 7 s of run
        first = popen_magpie(*gen_args(srv, out, 15, "--seed", "6"))
        wait_for_lines(out, 1)
        os.link(out, hard)
        for name in (out, hard):
            with pytest.raises(OutputLocked):
                OutputLock(name).acquire()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_exact(out, 15)
    assert not list(tmp_path.glob("*.lock"))  # nothing left beside the output


def test_run_that_fails_at_once_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        proc = run_magpie(*gen_args(srv, out, 3, "--model", "no-such-model"))
    assert proc.returncode == 3, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_torn_line_is_set_aside_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 3, "--seed", "1")).returncode == 0
        whole = out.read_bytes()
        out.write_bytes(whole + whole.splitlines()[0][:57])  # a crash mid-write
        proc = run_magpie(*gen_args(srv, out, 5))
    assert proc.returncode == 0, proc.stderr
    assert "torn last line was moved to" in proc.stderr
    assert_exact(out, 5)
    torn = tmp_path / "d.jsonl.torn"
    assert torn.read_bytes() == whole.splitlines()[0][:57] + b"\n"


def test_mixed_model_refused_unless_allowed(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 2, "--seed", "1")).returncode == 0
        before = out.read_bytes()
        args = [
            "generate",
            "-n",
            "4",
            "--host",
            srv.url,
            "-o",
            str(out),
            "--model",
            "llama3.1:8b",
            "--template",
            "chatml",
        ]
        proc = run_magpie(*args)
        assert proc.returncode == 2, proc.stderr
        assert "--allow-mixed" in proc.stderr and out.read_bytes() == before
        proc = run_magpie(*args, "--allow-mixed")
    assert proc.returncode == 0, proc.stderr
    assert len(assert_exact(out, 4)) == 4


def test_manifest_contents(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 3, "--seed", "12")).returncode == 0
        assert run_magpie(*gen_args(srv, out, 5)).returncode == 0
    m = manifest_of(out)
    assert m.backend == "ollama" and m.model == "llama3.1:8b" and m.host == srv.url
    assert m.model_digest and len(m.model_digest) >= 12
    assert m.template["name"] == "llama3" and m.template["text"].startswith("<|start_header_id|>")
    assert m.settings["instruction"]["temperature"] == 1.0 and m.seed == 12
    assert m.records == 5 and [r.written for r in m.runs] == [3, 2]
    assert m.runs[1].start_index == m.runs[0].next_index
    assert all(r.status == "done" and r.ended_at for r in m.runs)


def test_log_file_and_json_format(tmp_path: Path) -> None:
    out, log = tmp_path / "d.jsonl", tmp_path / "magpie.log"
    with scripted_server() as srv:
        proc = run_magpie(
            *gen_args(srv, out, 2, "--quiet", "--log-file", str(log), "--log-format", "json")
        )
        assert proc.returncode == 0 and proc.stderr == ""
        bad = run_magpie(
            "generate",
            "--backend",
            "ollama",
            "--host",
            "http://127.0.0.1:9",
            "-n",
            "1",
            "--log-file",
            str(log),
            "--log-format",
            "json",
            "--quiet",
        )
    import json

    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events][:2] == ["backend", "template"]
    summary = [e for e in events if e["event"] == "summary"][0]
    assert summary["written"] == 2 and summary["exit_status"] == 0
    assert bad.returncode == 3 and json.loads(bad.stderr)["level"] == "error"
    assert events[-1]["level"] == "error" and "ollama serve" in events[-1]["message"]


def test_interrupt_in_process_keeps_count_exact(tmp_path: Path) -> None:
    """The library API: a RunControl stop drops nothing that was written."""
    import asyncio

    from magpie import RunConfig
    from magpie.commands.generate import RunControl, agenerate

    out = tmp_path / "d.jsonl"
    with scripted_server(latency=0.05) as srv:
        cfg = RunConfig(
            num=100, output=str(out), model="llama3.1:8b", host=srv.url, seed=1, backoff_base=0.05
        )

        async def main():  # type: ignore[no-untyped-def]
            control = RunControl()
            seen = []

            def on_result(item, stats):  # type: ignore[no-untyped-def]
                seen.append(item)
                if len(seen) == 5:
                    control.request_stop()

            return await agenerate(cfg, control=control, on_result=on_result)

        result = asyncio.run(main())
    recs = assert_exact(out, result.stats.written)
    assert 5 <= len(recs) < 100 and int(result.exit_status) == 130
    assert threading.active_count() >= 1


def test_corrupt_manifest_is_set_aside_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    man = tmp_path / "d.jsonl.manifest.json"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 2, "--seed", "3")).returncode == 0
        man.write_text('{"manifest_version": 1, "outp')  # a torn manifest
        proc = run_magpie(*gen_args(srv, out, 3))
    assert proc.returncode == 0, proc.stderr
    assert "manifest was unreadable" in proc.stderr
    assert (
        tmp_path / "d.jsonl.manifest.json.corrupt"
    ).read_text() == '{"manifest_version": 1, "outp'
    assert manifest_of(out).records == 3
    assert_exact(out, 3)
