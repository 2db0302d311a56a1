"""A busy real Ollama (its queue full: 503 ``server busy``) slows a run down,
never ends it (issue 20, item 5); so does a llama-server still loading its
model (503 ``Loading model``).

Ollama 0.33 queues a request for a model it must (re)load in a channel of
``OLLAMA_MAX_QUEUE`` places and answers 503 beyond it, the pre-query render
(``_debug_render_only``) included: the scheduler runs before the render.  Here
``OLLAMA_MAX_QUEUE=1`` while other clients keep asking with other context
sizes (each a reload of the one runner), so nearly every request of the run
waits for a reload and many are turned away.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from magpie_cli import run_magpie
from real_servers import (
    RealLlamaServer,
    RealOllama,
    llama_server_binary,
    ollama_binary,
    post_json,
    smollm2_gguf,
)

from magpie.backends.registry import choose_backend
from magpie.backends.retry import RetryPolicy
from magpie.backends.spec import BackendSpec
from magpie.templates.rendered import aresolve_pre_query
from real.helpers import check_records, manifest

#: Seconds the server stays busy (the run's retries back off for about 70 s).
BUSY_FOR = 20.0


@pytest.fixture()
def busy_ollama(tmp_path: Path):  # type: ignore[no-untyped-def]
    binary = ollama_binary()
    if binary is None:
        pytest.skip("no Ollama binary")
    srv = RealOllama(binary, tmp_path / "busy", extra_env={"OLLAMA_MAX_QUEUE": "1"}).start()
    try:
        srv.create_smollm2_models(smollm2_gguf())
        yield srv
    finally:
        srv.stop()


def _noise(srv: RealOllama, stop: threading.Event, busy: list[int]) -> None:
    """Three clients, each asking again and again with a context size of its
    own: the models share one GGUF (one runner), and a new ``num_ctx``
    reloads it, so the one place in the queue is nearly always taken."""

    def client(num_ctx: int) -> None:
        while not stop.is_set():
            status, _ = post_json(
                srv.url + "/api/generate",
                {
                    "model": "smollm2-plain",
                    "prompt": "Hi",
                    "stream": False,
                    "options": {"num_predict": 2, "num_ctx": num_ctx},
                },
                timeout=60,
            )
            if status == 503:
                busy.append(1)

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in (512, 768, 1024)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()


def test_a_run_against_a_busy_real_ollama_finishes(busy_ollama: RealOllama, tmp_path: Path) -> None:
    stop, busy = threading.Event(), list[int]()
    noise = threading.Thread(target=_noise, args=(busy_ollama, stop, busy), daemon=True)
    noise.start()
    # The busy spell ends after BUSY_FOR seconds, as a queue that fills up drains.
    threading.Timer(BUSY_FOR, stop.set).start()
    out = tmp_path / "d.jsonl"
    try:
        proc = run_magpie(
            "generate", "-n", "2", "--model", "smollm2", "--host", busy_ollama.url,
            "--seed", "4", "--concurrency", "1", "--backoff-base", "0.5", "--max-retries", "8",
            "--instruction-max-tokens", "128", "--response-max-tokens", "128", "--keep-truncated",
            "-o", str(out),
            timeout=600,
        )  # fmt: skip
    finally:
        stop.set()
        noise.join(timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_records(out, 2)
    assert busy, "the server never answered 503: the test did not make it busy"
    retries = manifest(out)["runs"][-1]["retries"]
    assert retries.get("http_503"), (retries, proc.stderr)


#: Patient enough for a busy spell of the server (each request by itself):
#: 60 retries, at most a second apart, outlast BUSY_FOR.
PATIENT = RetryPolicy(max_retries=60, backoff_base=0.2, backoff_max=1.0, unreachable_budget=0.0)


async def _start_up(spec: BackendSpec, causes: list[str]) -> dict[str, Any]:
    """What a run asks before its first pair: the model's description and the
    pre-query (the server's render), each request retried (``causes``)."""
    backend = (await choose_backend(spec, causes.append)).backend
    try:
        info = await backend.describe()
        pre_query = await aresolve_pre_query("auto", backend, info)
    finally:
        await backend.aclose()
    return {"info": info.model_dump(exclude={"extra"}), "pre_query": pre_query.model_dump()}


def test_the_real_render_answers_503_when_the_queue_is_full_and_is_retried(
    busy_ollama: RealOllama,
) -> None:
    """Ollama schedules the runner before it renders (server/routes.go
    ChatHandler), and a request that must wait for a (re)load while
    ``OLLAMA_MAX_QUEUE`` requests already wait is answered 503
    (server/sched.go getRunner: ``ErrMaxQueue``).  The start-up's render is
    such a request: answered 503 by the real server, retried by itself, and
    the pre-query is the one a quiet server renders.  (Show, tags and version
    are not scheduled: the 503s are the render's.)"""
    spec = BackendSpec(backend="ollama", model="smollm2", host=busy_ollama.url, retry=PATIENT)
    quiet = asyncio.run(_start_up(spec, []))
    assert quiet["pre_query"]["source"] == "ollama-render"
    stop, busy = threading.Event(), list[int]()
    noise = threading.Thread(target=_noise, args=(busy_ollama, stop, busy), daemon=True)
    noise.start()
    # The busy spell ends after BUSY_FOR seconds, as a queue that fills up drains.
    threading.Timer(BUSY_FOR, stop.set).start()
    causes: list[str] = []
    try:
        time.sleep(1.0)  # the noise fills the queue first
        busy_start = asyncio.run(_start_up(spec, causes))
    finally:
        stop.set()
        noise.join(timeout=120)
    assert busy, "the server never answered 503: the test did not make it busy"
    assert "http_503" in causes, f"the render was never answered 503 ({causes})"
    assert busy_start == quiet


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_llama_server_still_loading_its_model_is_waited_for(tmp_path: Path) -> None:
    """llama-server listens before its model is loaded and answers 503
    "Loading model" to everything meanwhile (its models list, ``/props``,
    ``/tokenize``, ``/apply-template``): a start-up that begins then is
    answered 503, asks again, and ends with what a loaded server gives."""
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("no llama-server binary")
    for attempt in range(3):  # the load takes about 0.3 s: catch it loading
        srv = RealLlamaServer(binary, smollm2_gguf(), tmp_path / f"ls{attempt}")
        srv.start(wait=False)
        try:
            status = None
            deadline = time.monotonic() + 60
            while status is None and time.monotonic() < deadline:
                status = _status(srv.url + "/health")
                time.sleep(0.002)
            spec = BackendSpec(backend="openai", host=srv.url, retry=PATIENT)
            causes: list[str] = []
            early = asyncio.run(_start_up(spec, causes))
            assert _status(srv.url + "/health") == 200
            late = asyncio.run(_start_up(spec, []))
        finally:
            srv.stop()
        if status == 503:
            break
    assert status == 503, "llama-server was never caught loading its model"
    assert "http_503" in causes, causes
    assert early == late
    assert late["pre_query"]["source"] == "apply-template"
