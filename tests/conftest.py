"""Shared fixtures.

Every test runs with an isolated environment: no MAGPIE_* variables and an
OLLAMA_HOST that points at a closed port, so that no test ever reaches a real
Ollama server by accident and ``--backend auto`` behaves the same everywhere.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
#: The doubles and helpers (``tests/support``) import by their names, and the
#: real tier's package (``tests/real``) by ``real.``.
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "support"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLOSED_PORT = free_port()

#: The tiers (fast, slow, real, ray): markers by rule, order, times, timeouts.
pytest_plugins = ["tiers"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Settle llama.cpp's C++ runtime before any test imports usearch: the
    ``magpie`` command runs in this process (``magpie_cli.run_magpie``), and a
    process that imported usearch first can never load a llama.cpp model
    (see ``magpie.backends.llamacpp.model.settle_cpp_runtime``)."""
    from magpie.backends.llamacpp.model import settle_cpp_runtime

    settle_cpp_runtime()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("MAGPIE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{CLOSED_PORT}")
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model; its llama.cpp build checked first (a build this
    machine rejects fails the tests that use it with one line, instead of
    killing pytest at the first matrix multiply)."""
    from magpie.backends.llamacpp.buildcheck import check_build
    from magpie.backends.llamacpp.model import default_model_path

    path = default_model_path()
    check_build(path)
    return path


@pytest.fixture(scope="session")
def smollm2_info(smollm2_path: Path):  # type: ignore[no-untyped-def]
    from magpie.backends.llamacpp.model import EmbeddedBackend

    backend = EmbeddedBackend(smollm2_path, n_ctx=1024)

    async def describe():  # type: ignore[no-untyped-def]
        try:
            return await backend.describe()
        finally:
            await backend.aclose()

    return asyncio.run(describe())


@pytest.fixture(scope="session")
def llama_ollama():  # type: ignore[no-untyped-def]
    """An Ollama-protocol server backed by the real SmolLM2 model (``smollm2:135m``)."""
    from ollama_server import LlamaEngine, OllamaTestServer, smollm2_model

    with OllamaTestServer([smollm2_model(LlamaEngine())]) as srv:
        yield srv


@pytest.fixture()
def smollm2_double(llama_ollama):  # type: ignore[no-untyped-def]
    llama_ollama.clear_requests()
    llama_ollama.clear_faults()
    return llama_ollama


@pytest.fixture()
def scripted_ollama():  # type: ignore[no-untyped-def]
    """A server with several public models' templates and a scripted engine:
    for tests whose subject is the wire format, not generation."""
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    engine = ScriptedEngine()
    models = build_models(
        ["smollm2", "llama3.1", "llama3", "gemma2", "phi3", "mistral", "qwen2.5"], engine
    )
    with OllamaTestServer(models) as srv:
        yield srv
