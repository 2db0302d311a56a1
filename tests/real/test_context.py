"""Prompts longer than the model's context, on the real servers (the ``real``
tier): no record is made of a conversation the server cut; the pairs that do
not fit are rejected as ``context_overflow`` with the counts.

The protocol facts under this (Ollama's ``truncate``/``shift``, llama-server's
400) and the doubles' parity are in test_ollama_protocol.py and below.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from magpie_cli import run_magpie
from real_servers import RealLlamaServer, RealOllama, llama_server_binary, smollm2_gguf

from magpie.backends.base import Sampling
from magpie.backends.openai import OpenAIBackend
from magpie.errors import ContextOverflow

from .conftest import CONTEXT, CONTEXT_MODEL
from .helpers import records

#: About 70 tokens; six times over (about 430) it fills most of the 512-token
#: context, so that a conversation drawn with it outgrows the context by its
#: second or third turn, while one drawn with a short system prompt fits.
SYSTEM_BLOCK = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. You answer "
    "questions about cooking, gardening, travel, history, science and everyday life. You "
    "explain things step by step, you give examples, you say when you are not sure, and "
    "you keep a friendly and patient tone with every user, whatever they ask. "
)
SYSTEMS = (
    '[systems.short]\nprompt = "You are a helpful assistant."\n'
    f'[systems.long]\nprompt = "{SYSTEM_BLOCK * 6}"\n'
)


def _stage_infos(rec: dict[str, Any]) -> list[dict[str, Any]]:
    infos = [rec["instruction_generation"], rec["response_generation"]]
    for turn in rec.get("turn_generations") or []:
        infos += [turn["instruction"], turn["response"]]
    return infos


def test_turns_on_a_small_context_never_record_a_cut_conversation(
    context_model: RealOllama, tmp_path: Path
) -> None:
    """``--turns 3`` on a model made with ``PARAMETER num_ctx 512``: Ollama's
    defaults would cut a long conversation to 258 tokens and answer it
    (on main such records were written, the server's log the only trace);
    with truncate/shift false nothing is cut (the server logs no truncation),
    every request of every record fit the context whole, and the pairs that
    did not fit are rejected as context_overflow with the counts."""
    out, rejects = tmp_path / "turns.jsonl", tmp_path / "rejects.jsonl"
    config = tmp_path / "systems.toml"
    config.write_text(SYSTEMS)  # one of the two drawn per attempt
    log_start = len(context_model.log())
    res = run_magpie(
        *("generate", "--host", context_model.url, "--model", CONTEXT_MODEL),
        *("-o", str(out), "--rejects", str(rejects), "-n", "2", "--seed", "8", "--turns", "3"),
        *("--config", str(config), "--instruction-max-tokens", "64"),
        *("--response-max-tokens", "96", "--keep-truncated"),
        # One request at a time: the server batches none, so its texts (and with
        # them which attempts outgrow the context: two or three of 19 here)
        # repeat from run to run.
        *("--concurrency", "1"),
        timeout=900,
    )
    assert res.returncode == 0, res.stderr
    log = context_model.log()[log_start:]
    assert "truncating input prompt" not in log
    assert log.count("starting llama-server") <= 1  # render and generation: one load
    recs = records(out)
    assert len(recs) == 2
    for rec in recs:
        assert rec["turns"] == 3
        for info in _stage_infos(rec):
            assert info["prompt_tokens"] + info["completion_tokens"] <= CONTEXT, info
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    overflow = [r for r in lines if r["reject_reason"] == "context_overflow"]
    assert overflow, [r["reject_reason"] for r in lines]
    for r in overflow:
        assert f"tokens, context {CONTEXT})" in r["reject_detail"]
        assert "--num-ctx" in r["reject_detail"]


# ----------------------------------------------------------------- llama-server

#: llama-server's context per slot here (``-c``, one slot).
SMALL_CTX = 256
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=300)
OVER_LONG = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens
NEAR_THE_END = "The quick brown fox jumps over the lazy dog. " * 20 + "Count: 1, 2, 3,"


@pytest.fixture(scope="module")
def small_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlamaServer]:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("no llama-server binary")
    srv = RealLlamaServer(
        binary, smollm2_gguf(), tmp_path_factory.mktemp("small-ctx"), parallel=1, ctx=SMALL_CTX
    ).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_llama_server_refuses_and_stops_at_the_end_of_a_small_context(
    small_srv: RealLlamaServer,
) -> None:
    async def main() -> tuple[ContextOverflow, ContextOverflow, Any]:
        async with OpenAIBackend(None, small_srv.url) as b:
            with pytest.raises(ContextOverflow) as raw:
                await b.complete(OVER_LONG, sampling=GREEDY, stop=[])
            with pytest.raises(ContextOverflow) as chat:
                await b.chat([{"role": "user", "content": OVER_LONG}], sampling=GREEDY)
            near = await b.complete(NEAR_THE_END, sampling=GREEDY, stop=[])
            return raw.value, chat.value, near

    raw, chat, near = asyncio.run(main())
    for err in (raw, chat):
        assert err.context == SMALL_CTX and err.prompt_tokens is not None
        assert err.prompt_tokens > SMALL_CTX and not err.retryable
    assert near.finish_reason == "length"
    assert near.prompt_tokens + near.completion_tokens == SMALL_CTX


def _reply(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Status, error body, or finish reason and usage of a non-streamed reply."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 - loopback
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "error": json.loads(exc.read())["error"]}
    usage = data["usage"]
    return {
        "status": 200,
        "finish": data["choices"][0]["finish_reason"],
        "prompt + completion": usage["prompt_tokens"] + usage["completion_tokens"],
    }


def test_double_refuses_like_llama_server(small_srv: RealLlamaServer) -> None:
    """The OpenAI double's ``context`` against llama-server's ``-c``: the same
    400 body for a raw prompt that does not fit, and the same stop at the end
    of the context."""
    from ollama_server import LlamaEngine
    from openai_server import OpenAITestServer, smollm2_served

    common = {"temperature": 0, "top_k": 0, "max_tokens": 300, "seed": 3}
    probes = [
        {"prompt": OVER_LONG, **common},
        {"prompt": NEAR_THE_END, **common},
    ]
    served = smollm2_served(LlamaEngine(n_threads=1))
    with OpenAITestServer([served], flavor="llamacpp", context=SMALL_CTX) as double:
        diffs = []
        for body in probes:
            real = _reply(small_srv.url + "/v1/completions", body)
            ours = _reply(double.url + "/v1/completions", body)
            if real != ours:
                diffs.append(f"{body['prompt'][:20]}: real {real} != double {ours}")
    assert not diffs, "\n".join(diffs)
