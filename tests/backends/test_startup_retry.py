"""Every request a run makes before its first pair goes through the retry
policy (issue 20, item 5): a server that answers 30% of all requests with 503
(what Ollama answers when ``OLLAMA_MAX_QUEUE`` is full) slows a run down, never
ends it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import (
    MODEL,
    assert_exact,
    gen_args,
    manifest_of,
    rendering_server,
    scripted_server,
)
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


def test_doctor_says_a_server_that_stays_busy_is_busy_and_asks_briefly(tmp_path: Path) -> None:
    """A render that answers 503 every time: doctor asks it again a couple of
    times (not the run's five), then fails the template check saying the
    server is busy and that a run would retry, not "restart it"."""
    from magpie.commands.doctor import QUICK_RETRIES

    with rendering_server() as srv:
        srv.inject(HttpError(503, BUSY), times=None, path="/api/chat")
        proc = run_magpie(
            "doctor", "--json", "--model", "smollm2:135m", "--host", srv.url,
            env={"MAGPIE_BACKOFF_BASE": "0.01"},
        )  # fmt: skip
        renders = [r for r in srv.requests if (r.body or {}).get("_debug_render_only")]
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert proc.returncode == 1, proc.stderr
    assert checks["model"]["ok"] and not checks["template"]["ok"]
    assert "503" in checks["template"]["detail"] and BUSY in checks["template"]["detail"]
    assert "busy" in checks["template"]["fix"] and "retries" in checks["template"]["fix"]
    assert len(renders) == 1 + QUICK_RETRIES


def test_a_pool_forwards_the_whole_backend_contract() -> None:
    """A backend over backends (a pool of hosts) must forward every method of
    the contract, the start-up retry policy included: the base class's
    default (``supports_embed`` False, ``retry_start_requests`` on the pool
    but not its hosts) would silently stand in for the hosts' own."""
    from magpie.backends.base import Backend
    from magpie.backends.pool import HostPool

    public = {n for n in dir(Backend) if not n.startswith("_")}
    own = {n for n in vars(HostPool) if not n.startswith("_")}
    assert public - own - {"name", "render_source", "auto_concurrency"} == set()


# -- every backend, each request retried by itself ------------------------------------


def _template(path: Path) -> dict:
    """The pre-query part of a run's manifest (what a top-up compares)."""
    return dict(manifest_of(path).template)


def _openai_server(**kwargs):  # type: ignore[no-untyped-def]
    from openai_server import OpenAITestServer, smollm2_served

    served = smollm2_served(ScriptedEngine(), model_id="smollm2.gguf")
    return OpenAITestServer([served], flavor="llamacpp", **kwargs)


def _openai_args(url: str | list[str], out: Path, n: int, *extra: str) -> list[str]:
    hosts = [url] if isinstance(url, str) else url
    return [
        "generate", "--backend", "openai", *(a for h in hosts for a in ("--host", h)),
        "-n", str(n), "-o", str(out), "--backoff-base", "0.01", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ten_openai_runs_against_thirty_percent_503s_all_finish_with_the_same_pre_query(
    tmp_path: Path,
) -> None:
    """llama-server asked at start for its models, ``/props``, ``/tokenize`` (twice)
    and ``/apply-template``: every third-or-so request a 503 (llama-server's
    answer while it loads the model).  Each run finishes, and with the pre-query
    of a run that met no fault: a 503 is not taken for "no such endpoint" (a
    busy ``/tokenize`` had made the pre-query lose its leading ``<|im_start|>``,
    a busy ``/apply-template`` switched the source to the GGUF's template)."""
    quiet = tmp_path / "quiet.jsonl"
    with _openai_server() as srv:
        assert run_magpie(*_openai_args(srv.url, quiet, 1, "--seed", "0")).returncode == 0
    for run in range(10):
        out = tmp_path / f"run{run}.jsonl"
        with _openai_server() as srv:
            srv.inject(HttpError(503, "Loading model"), times=None, share=SHARE)
            for _ in range(run % 4):
                srv._take_fault("/v1/models")  # noqa: SLF001 - shift the pattern
            proc = run_magpie(*_openai_args(srv.url, out, 3, "--seed", str(run)))
        assert proc.returncode == 0, f"run {run}: {proc.stderr}"
        assert_exact(out, 3)
        assert _template(out) == _template(quiet), f"run {run}"
        assert manifest_of(out).runs[-1].retries.get("http_503"), proc.stderr


@pytest.mark.parametrize("path", ["/v1/models", "/props", "/tokenize", "/apply-template"])
def test_a_503_on_each_openai_start_up_request_is_retried(tmp_path: Path, path: str) -> None:
    quiet = tmp_path / "quiet.jsonl"
    with _openai_server() as srv:
        assert run_magpie(*_openai_args(srv.url, quiet, 1, "--seed", "0")).returncode == 0
    out = tmp_path / "d.jsonl"
    with _openai_server() as srv:
        srv.inject(HttpError(503, "Loading model"), times=1, path=path)
        proc = run_magpie(*_openai_args(srv.url, out, 1, "--seed", "0"))
        asked = len(srv.requests_to(path))
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 1)
    assert _template(out) == _template(quiet)
    assert manifest_of(out).runs[-1].retries == {"http_503": 1}
    assert asked >= 2, f"{path} was not asked again"


def _ollama_args(url: str | list[str], out: Path, n: int, *extra: str) -> list[str]:
    hosts = [url] if isinstance(url, str) else url
    return [
        "generate", "--model", "smollm2:135m", *(a for h in hosts for a in ("--host", h)),
        "-n", str(n), "-o", str(out), "--backoff-base", "0.01", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ten_runs_whose_pre_query_is_rendered_against_thirty_percent_503s(
    tmp_path: Path,
) -> None:
    """The issue's run: the pre-query comes from the server's render
    (``_debug_render_only``, which Ollama answers 503 when its queue is full);
    every third-or-so request a 503.  All finish, each with the pre-query of a
    run that met no fault."""
    quiet = tmp_path / "quiet.jsonl"
    with rendering_server() as srv:
        assert run_magpie(*_ollama_args(srv.url, quiet, 1, "--seed", "0")).returncode == 0
    assert _template(quiet)["source"] == "ollama-render"
    for run in range(10):
        out = tmp_path / f"run{run}.jsonl"
        with rendering_server() as srv:
            srv.inject(HttpError(503, BUSY), times=None, share=SHARE)
            for _ in range(run % 4):
                srv._take_fault("/api/version")  # noqa: SLF001 - shift the pattern
            proc = run_magpie(*_ollama_args(srv.url, out, 3, "--seed", str(run)))
            renders = [r for r in srv.requests if (r.body or {}).get("_debug_render_only")]
        assert proc.returncode == 0, f"run {run}: {proc.stderr}"
        assert_exact(out, 3)
        assert _template(out) == _template(quiet), f"run {run}"
        assert renders, "the pre-query was not rendered by the server"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/api/show", "/api/tags", "/api/version", "/api/chat"])
def test_a_503_on_each_start_up_request_leaves_the_pre_query_as_it_is(
    tmp_path: Path, path: str
) -> None:
    """The first request to each start-up path of a server that renders answers
    503 (``/api/chat`` first is the render): the run goes on with the server's
    own rendering, not marker matching."""
    quiet = tmp_path / "quiet.jsonl"
    with rendering_server() as srv:
        assert run_magpie(*_ollama_args(srv.url, quiet, 1, "--seed", "0")).returncode == 0
    out = tmp_path / "d.jsonl"
    with rendering_server() as srv:
        srv.inject(HttpError(503, BUSY), times=1, path=path)
        proc = run_magpie(*_ollama_args(srv.url, out, 1, "--seed", "0"))
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 1)
    assert _template(out) == _template(quiet)
    assert manifest_of(out).runs[-1].retries == {"http_503": 1}


@pytest.mark.slow
def test_a_503_on_every_host_of_a_pool_is_retried(tmp_path: Path) -> None:
    """``--host A --host B``, each answering its first show and its first render
    with 503: the run neither reads two busy hosts as "none is reachable" (exit
    3) nor falls back from the server's render to marker matching."""
    quiet = tmp_path / "quiet.jsonl"
    with rendering_server() as srv:
        assert run_magpie(*_ollama_args(srv.url, quiet, 1, "--seed", "0")).returncode == 0
    out = tmp_path / "d.jsonl"
    with rendering_server() as a, rendering_server() as b:
        for srv in (a, b):
            srv.inject(HttpError(503, BUSY), times=1, path="/api/show")
            srv.inject(HttpError(503, BUSY), times=1, path="/api/chat")
        proc = run_magpie(*_ollama_args([a.url, b.url], out, 2, "--seed", "0"))
    assert proc.returncode == 0, proc.stderr
    assert_exact(out, 2)
    assert _template(out) == _template(quiet)
    assert _template(out)["source"] == "ollama-render"


def _backends():  # type: ignore[no-untyped-def]
    """(name, servers, spec settings) of each backend a spec can open over HTTP."""
    from openai_server import OpenAITestServer, smollm2_served

    def ollama(n: int):  # type: ignore[no-untyped-def]
        return [rendering_server() for _ in range(n)]

    def openai(n: int, flavor: str):  # type: ignore[no-untyped-def]
        return [
            OpenAITestServer([smollm2_served(ScriptedEngine(), model_id="smol")], flavor=flavor)
            for _ in range(n)
        ]

    return {
        "ollama": (lambda: ollama(1), {"backend": "ollama", "model": "smollm2:135m"}, "auto"),
        "ollama-pool": (lambda: ollama(2), {"backend": "ollama", "model": "smollm2:135m"}, "auto"),
        "llamacpp": (lambda: openai(1, "llamacpp"), {"backend": "openai"}, "auto"),
        "llamacpp-pool": (lambda: openai(2, "llamacpp"), {"backend": "openai"}, "auto"),
        # vLLM renders nothing and shows no template: a named family.
        "vllm": (lambda: openai(1, "vllm"), {"backend": "openai", "model": "smol"}, "smollm2"),
    }


async def _start_up(spec, template):  # type: ignore[no-untyped-def]
    """What a run and doctor ask a backend before the first pair."""
    from magpie.backends.registry import choose_backend
    from magpie.templates.rendered import aresolve_pre_query

    backend = (await choose_backend(spec)).backend
    try:
        probe = await backend.probe()
        info, line = await backend.check_model()
        described = await backend.describe()
        pre_query = await aresolve_pre_query(template, backend, described)
        rendered = await backend.render_chat([{"role": "user", "content": "x"}])
    finally:
        await backend.aclose()
    return probe, info.model_dump(), line, described.model_dump(), pre_query, rendered


@pytest.mark.parametrize("name", list(_backends()))
def test_every_start_up_request_of_every_backend_is_retried(name: str) -> None:
    """Against servers that answer every other request of every path with 503,
    what a backend answers at start (probe, check_model, describe, the
    pre-query, a render) is what it answers without a fault: each request is
    retried by itself (retrying a whole ``describe`` of four requests, each
    second one busy, never ends)."""
    import asyncio
    import contextlib

    from magpie.backends.retry import RetryPolicy
    from magpie.backends.spec import BackendSpec

    make, settings, template = _backends()[name]
    policy = RetryPolicy(max_retries=3, backoff_base=0.001, unreachable_budget=0.0)
    results = []
    for share in (None, 0.5):
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(s) for s in make()]
            for srv in servers:
                if share is not None:
                    srv.inject(HttpError(503, BUSY), times=None, share=share)
            urls = [s.url for s in servers]
            spec = BackendSpec(**settings, host=urls if len(urls) > 1 else urls[0], retry=policy)
            got = json.dumps(asyncio.run(_start_up(spec, template)), default=repr)
            for i, url in enumerate(urls):  # each run has servers of its own
                got = got.replace(url, f"URL{i}").replace(url.split("//")[1], f"HOST{i}")
        results.append(got)
    quiet, busy = results
    assert busy == quiet


def test_auto_never_swaps_a_busy_ollama_for_the_embedded_model(tmp_path: Path) -> None:
    """``--backend auto`` with no --model: an Ollama whose model list stays
    busy (503 through every retry) is there; the run says so (exit 3) instead
    of switching to the embedded model without a word."""
    out = tmp_path / "d.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine())) as srv:
        srv.inject(HttpError(503, BUSY), times=None, path="/api/tags")
        proc = run_magpie(
            "generate", "-n", "1", "--host", srv.url, "-o", str(out),
            "--backoff-base", "0.01", "--max-retries", "2",
        )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "answers but stays busy" in proc.stderr and "backend embedded:" not in proc.stderr
    assert not out.exists()
