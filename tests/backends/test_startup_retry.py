"""Every request a run makes before its first pair goes through the retry
policy (issue 20, item 5): a server that answers 30% of all requests with 503
(what Ollama answers when ``OLLAMA_MAX_QUEUE`` is full) slows a run down, never
ends it."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_helpers import MODEL, assert_exact, gen_args, manifest_of, scripted_server
from magpie_cli import run_magpie
from ollama_server import BUSY, HttpError, OllamaTestServer, ScriptedEngine, build_models

#: A share of every request, start-up ones included, answered 503.
SHARE = 0.3


@pytest.mark.slow
def test_ten_runs_against_thirty_percent_503s_all_finish(tmp_path: Path) -> None:
    """10 runs, each with its own server whose every third-or-so request (show,
    tags, version, the pre-query render, generations) is a 503: all finish."""
    for run in range(10):
        out = tmp_path / f"run{run}.jsonl"
        with scripted_server() as srv:
            # The first request of each run hit at a different place.
            srv.inject(HttpError(503, BUSY), times=None, share=SHARE)
            for _ in range(run % 3):
                srv._take_fault("/api/version")  # noqa: SLF001 - shift the pattern
            proc = run_magpie(*gen_args(srv, out, 3, "--seed", str(run)))
            paths = {r.path for r in srv.requests}
        assert proc.returncode == 0, f"run {run}: {proc.stderr}"
        assert_exact(out, 3)
        assert manifest_of(out).runs[-1].retries.get("http_503"), proc.stderr
        assert {"/api/show", "/api/chat", "/api/generate"} <= paths


@pytest.mark.parametrize("path", ["/api/show", "/api/tags", "/api/version", "/api/chat"])
def test_a_503_on_each_start_up_request_is_retried(tmp_path: Path, path: str) -> None:
    """The first request to each start-up path answers 503; the run goes on
    (``/api/chat`` first is the pre-query render: ``_debug_render_only``)."""
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        srv.inject(HttpError(503, BUSY), times=1, path=path)
        proc = run_magpie(*gen_args(srv, out, 2, "--seed", "1"))
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 2)


def test_a_busy_server_is_not_taken_for_a_missing_one(tmp_path: Path) -> None:
    """``--backend auto`` without --model asks Ollama for its models: a 503
    there is retried, not read as "Ollama is not running" (which would switch
    the run to the embedded model)."""
    engine = ScriptedEngine()
    out = tmp_path / "d.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], engine)) as srv:
        srv.inject(HttpError(503, BUSY), times=2, path="/api/tags")
        proc = run_magpie(
            "generate", "-n", "1", "--host", srv.url, "-o", str(out), "--backoff-base", "0.01",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "backend ollama" in proc.stderr, proc.stderr
    assert_exact(out, 1)
    assert MODEL.startswith("llama3.1")


def test_doctor_retries_a_busy_server(tmp_path: Path) -> None:
    with scripted_server() as srv:
        srv.inject(HttpError(503, BUSY), times=None, share=SHARE)
        proc = run_magpie(
            "doctor", "--model", MODEL, "--host", srv.url, env={"MAGPIE_BACKOFF_BASE": "0.01"}
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_start_retry_forwards_the_whole_backend_contract() -> None:
    """A method added to the contract must be forwarded by the wrapper: the
    base class's default (``supports_embed`` False, say) would silently stand
    in for the backend's own."""
    from magpie.backends.base import Backend
    from magpie.backends.retry import StartRetry

    public = {n for n in dir(Backend) if not n.startswith("_")}
    own = {n for n in vars(StartRetry) if not n.startswith("_")}
    assert public - own - {"name", "render_source", "auto_concurrency"} == set()
