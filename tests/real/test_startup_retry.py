"""A busy real Ollama (its queue full: 503 ``server busy``) slows a run down,
never ends it (issue 20, item 5).

Ollama 0.33 queues a request for a model it must (re)load in a channel of
``OLLAMA_MAX_QUEUE`` places and answers 503 beyond it, the pre-query render
(``_debug_render_only``) included: the scheduler runs before the render.  Here
``OLLAMA_MAX_QUEUE=1`` while other clients keep asking with other context
sizes (each a reload of the one runner), so nearly every request of the run
waits for a reload and many are turned away.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from magpie_cli import run_magpie
from real_servers import RealOllama, ollama_binary, post_json, smollm2_gguf

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
