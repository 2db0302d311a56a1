"""Reasoning models on the real Ollama: thinking templates made by ``ollama
create`` over the SmolLM2 weights (tests/real/conftest.py THINKING_MODELS).

SmolLM2-135M never writes ``<think>`` itself, so what a real model's thinking
looks like on the wire comes from a template whose generation prompt opens the
block (then Ollama's parser returns what the model writes as ``thinking``); the
split of a whole ``<think>...</think>`` answer is covered against the doubles
(tests/pipeline/test_reasoning.py), whose parser is Ollama's, ported."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from magpie_cli import run_magpie
from real_servers import RealOllama

from magpie.backends.base import Sampling
from magpie.backends.ollama import OllamaBackend
from magpie.pipeline.stages.reasoning import split_reasoning
from magpie.templates.rendered import render_pre_query

from .helpers import check_records

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=24)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _chat(url: str, model: str, think: bool | None, direct: bool = True):  # type: ignore[no-untyped-def]
    async with OllamaBackend(model, url, direct_stream=direct) as b:
        return await b.chat(QUESTION, sampling=GREEDY, seed=1, think=think)


def test_qwen3_template_is_detected_and_reports_thinking(thinking_models: RealOllama) -> None:
    async def describe():  # type: ignore[no-untyped-def]
        async with OllamaBackend("qwen3-on-smollm2", thinking_models.url) as b:
            info = await b.describe()
            return info, await render_pre_query(b, info, None)

    info, pq = _run(describe())
    assert info.capabilities is not None and "thinking" in info.capabilities
    # The server's rendering of the real qwen3 template: no default system block.
    assert pq.text == "<|im_start|>user\n"
    from magpie.templates.resolve import detect_family

    assert info.template is not None and detect_family(info.template).name == "qwen3"  # type: ignore[union-attr]


def test_thinking_comes_back_apart_on_both_client_paths(thinking_models: RealOllama) -> None:
    """A prompt that ends in <think>: Ollama's parser starts inside the thinking;
    SmolLM2 never closes it, so all it writes is ``message.thinking``."""
    for direct in (True, False):
        c = _run(_chat(thinking_models.url, "thinking-on-smollm2", None, direct))
        assert c.thinking and c.thinking.strip(), c
        assert c.text == ""
        answer, reasoning, _ = split_reasoning(c)
        assert answer == "" and reasoning == c.thinking.strip()
    # think: false: the template opens no block and nothing is parsed.
    off = _run(_chat(thinking_models.url, "thinking-on-smollm2", False))
    assert off.thinking is None and off.text.strip()
    assert "<think>" not in off.text


def test_generate_reasoning_off(thinking_models: RealOllama, tmp_path: Path) -> None:
    """``--reasoning off`` on the real qwen3 template: think false is sent
    (the template writes /no_think and an empty think block), records hold no
    reasoning and no thinking markup."""
    out = tmp_path / "off.jsonl"
    res = run_magpie(
        "generate",
        "--host",
        thinking_models.url,
        "-o",
        str(out),
        "-n",
        "2",
        "--model",
        "qwen3-on-smollm2",
        "--reasoning",
        "off",
        "--instruction-max-tokens",
        "96",
        "--response-max-tokens",
        "96",
        "--keep-truncated",
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    for rec in check_records(out, 2):
        assert rec["reasoning"] is None
        assert "reasoning_content" not in rec["messages"][1]
        assert "<think>" not in rec["response"] and "</think>" not in rec["response"]
        assert "<think>" not in rec["instruction"]


def test_an_answer_that_only_thinks_is_rejected(thinking_models: RealOllama) -> None:
    """``--reasoning keep`` on a model whose answer is all thinking, cut off at
    the token limit: the response stage rejects the pair (never a record with
    an empty answer); with a limit it does not reach, ``reasoning_only``."""
    from magpie.backends.base import Completion
    from magpie.pipeline.scheduler import Instruction, Pipeline, PipelineSettings
    from magpie.records import Rejection

    async def answer(max_tokens: int):  # type: ignore[no-untyped-def]
        async with OllamaBackend("thinking-on-smollm2", thinking_models.url) as b:
            pq = await render_pre_query(b, await b.describe(), None)
            settings = PipelineSettings(
                response=GREEDY.model_copy(update={"max_tokens": max_tokens}), keep_truncated=True
            )
            pipe = Pipeline(b, pq, seed=3, settings=settings)
            inst = Instruction(0, QUESTION[0]["content"], Completion(text="x"), seed=1)
            return await pipe.response(inst)

    short = _run(answer(8))
    assert isinstance(short, Rejection) and short.stage == "response"
    assert short.reason == "reasoning_only", short
