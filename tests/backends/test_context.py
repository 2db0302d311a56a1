"""A prompt longer than the model's context: the server refuses it (never cuts
it), magpie rejects the pair as ``context_overflow`` with the counts, never
retries it, and says how to raise the context (``--num-ctx``).

Against the test doubles over real HTTP (the real ``ollama`` client on its
path), which answer such a prompt as the real servers do (tests/real holds
them together): Ollama 0.33 cuts it silently unless asked not to
(``truncate``/``shift`` false), llama-server and vLLM refuse it with 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ollama_server import (
    _WORDS,
    PROMPT_TOO_LONG,
    Generation,
    OllamaTestServer,
    ScriptedEngine,
    _instruction,
    context_error,
    cut_limit,
    smollm2_model,
)
from openai_server import OpenAITestServer, smollm2_served
from typer.testing import CliRunner

from magpie.backends.base import Sampling
from magpie.backends.http import context_overflow
from magpie.backends.ollama import OllamaBackend
from magpie.backends.openai import OpenAIBackend
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.cli.app import app
from magpie.commands.generate import prepare
from magpie.commands.generate.run import generate
from magpie.errors import BackendError, ContextOverflow, ExitStatus, MagpieError
from magpie.pipeline.scheduler import CONTEXT_OVERFLOW, Pipeline, PipelineSettings
from magpie.records import Record, Rejection
from magpie.settings import build_config

MODEL = "smollm2:135m"
SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_tokens=64)
#: 300 scripted tokens (the double counts a raw prompt's words).
LONG_PROMPT = " ".join(_WORDS[i % len(_WORDS)] for i in range(300))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _uneven(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    """Instructions by seed; answers short or long (70 words) by the question,
    so that some conversations of three turns fit a small context and some do not."""
    if isinstance(source, str):
        return _instruction(int(options.get("seed") or 0))
    h = hashlib.blake2b(source[-1]["content"].encode(), digest_size=1).digest()[0]
    if h % 2 == 0:
        return "Yes, that works."
    return "Consider " + ", ".join(_WORDS[(h * 7 + i * 13) % len(_WORDS)] for i in range(70)) + "."


def small_context_model(num_ctx: int, engine: Any = None) -> Any:
    """SmolLM2 with ``PARAMETER num_ctx`` in its Modelfile (what `ollama show` lists)."""
    model = smollm2_model(engine or ScriptedEngine(text_fn=_uneven))
    model.show["parameters"] += f"\nnum_ctx                        {num_ctx}"
    model.show["modelfile"] += f"PARAMETER num_ctx {num_ctx}\n"
    return model


@pytest.fixture()
def srv() -> Iterator[OllamaTestServer]:
    with OllamaTestServer([small_context_model(100)]) as s:
        yield s


# --------------------------------------------------------------------------- the join


def test_no_record_has_a_conversation_the_server_cut(tmp_path: Path) -> None:
    """``--turns 3`` on a model with ``PARAMETER num_ctx 100``: Ollama would cut
    the later turns' prompts silently (what main did: records made of
    conversations the model never saw whole); magpie asks it not to, so those
    pairs are rejected as context_overflow, the counts in --rejects, the run
    goes on, and its summary says how to raise the context."""
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    model = small_context_model(100)
    with OllamaTestServer([model]) as server:
        cfg = build_config(
            {
                "model": MODEL,
                "host": server.url,
                "num": 3,
                "turns": 3,
                "seed": 1,
                "output": str(out),
                "rejects": str(rejects),
            },
            environ={},
        )
        result = generate(cfg)
        cut = server.cut_prompts
        generation = [r.body for r in server.requests if r.path in ("/api/generate", "/api/chat")]
    assert cut == 0, f"the server cut {cut} prompts silently"
    assert all(b["truncate"] is False and b["shift"] is False for b in generation)
    records = [Record.model_validate_json(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    count = model.engine.prompt_tokens
    for rec in records:
        messages = [{"role": "system", "content": model.system}] + [
            {"role": m.role, "content": m.content} for m in rec.messages[:-1]
        ]
        assert count(messages) < 100  # the last answer's prompt fit whole
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    overflow = [r for r in lines if r["reject_reason"] == CONTEXT_OVERFLOW]
    assert overflow, [r["reject_reason"] for r in lines]
    for r in overflow:
        assert r["reject_stage"] == "request"
        assert "tokens, context 100)" in r["reject_detail"]
        assert "--num-ctx" in r["reject_detail"] and "PARAMETER num_ctx" in r["reject_detail"]
    assert result.stats.rejected[CONTEXT_OVERFLOW] == len(overflow)
    assert not any(reason.startswith("failed_") for reason in result.stats.rejected)
    assert "context_overflow" not in result.stats.retries
    (warning,) = [w for w in result.warnings if CONTEXT_OVERFLOW in w]
    assert f"{len(overflow)} of {result.stats.attempts} attempts" in warning
    assert "--num-ctx" in warning


@pytest.mark.parametrize("direct", [True, False])
def test_an_over_long_prompt_is_refused_not_cut_and_not_retried(
    srv: OllamaTestServer, direct: bool
) -> None:
    """Both request paths (aiohttp and the official client) send truncate and
    shift false; the 400 is a ContextOverflow with the server's counts, which
    the retry policy does not retry."""

    async def main() -> None:
        async with OllamaBackend(MODEL, srv.url, direct_stream=direct) as b:
            with pytest.raises(ContextOverflow) as info:
                await call_with_retry(
                    lambda: b.complete(LONG_PROMPT, sampling=SAMPLING, stop=[]),
                    RetryPolicy(backoff_base=0.0),
                )
            err = info.value
            assert (err.prompt_tokens, err.context) == (300, 100)
            assert (err.retryable, err.cause) == (False, "context_overflow")
            assert isinstance(err, BackendError)
            assert "300 tokens, context 100" in str(err) and "--num-ctx 1024" in str(err)
            with pytest.raises(ContextOverflow):
                await b.chat([{"role": "user", "content": LONG_PROMPT}], sampling=SAMPLING)

    run(main())
    sent = srv.requests_to("/api/generate") + srv.requests_to("/api/chat")
    assert len(sent) == 2  # one each: no retry
    assert all(r.body["truncate"] is False and r.body["shift"] is False for r in sent)
    assert srv.cut_prompts == 0


def test_num_ctx_is_sent_with_every_request_that_loads_the_model(srv: OllamaTestServer) -> None:
    """``num_ctx`` (and shift) load the model: generation and render send the
    same, or Ollama reloads the model between them."""

    async def main() -> None:
        async with OllamaBackend(MODEL, srv.url, num_ctx=512) as b:
            b._renders = True  # the double's version predates render-only requests
            await b.render_chat([{"role": "user", "content": "hi"}])
            c = await b.complete(LONG_PROMPT, sampling=SAMPLING, stop=[])
            assert c.prompt_tokens == 300  # fits 512: not cut
            await b.chat([{"role": "user", "content": "hi"}], sampling=SAMPLING)

    run(main())
    bodies = [r.body for r in srv.requests if r.path in ("/api/generate", "/api/chat")]
    assert len(bodies) == 3
    for body in bodies:
        assert body["options"]["num_ctx"] == 512
        assert (body["truncate"], body["shift"]) == (False, False)


def test_a_generation_that_reaches_the_end_of_the_context_stops_there() -> None:
    """shift false: no context shift, the answer stops at the end of the
    context with finish reason "length" (a truncated answer, not a cut
    prompt); prompt and answer together fill the context."""
    engine = ScriptedEngine(text_fn=lambda source, options: " ".join(_WORDS[:50]))
    with OllamaTestServer([small_context_model(100, engine)]) as server:

        async def main() -> Any:
            async with OllamaBackend(MODEL, server.url) as b:
                return await b.complete(" ".join(_WORDS[:80]), sampling=SAMPLING, stop=[])

        c = run(main())
    assert c.finish_reason == "length" and c.completion_tokens < SAMPLING.max_tokens
    assert c.prompt_tokens + c.completion_tokens == 100


class OldRunner(ScriptedEngine):
    """An Ollama older than 0.12.6: it ignores ``truncate`` and cuts a prompt
    that does not fit to exactly the context, which ``prompt_eval_count``
    then reports (no ``prompt_tokens``: the double does not check it)."""

    prompt_tokens = None

    def generate(self, prompt: str, options: Mapping[str, Any], fmt: Any = None) -> Generation:
        gen = super().generate(prompt, options, fmt)
        gen.prompt_eval_count = min(gen.prompt_eval_count, int(options.get("num_ctx") or 4096))
        return gen


def test_an_older_server_that_cuts_is_caught_where_the_context_is_known() -> None:
    with OllamaTestServer([smollm2_model(OldRunner())]) as server:

        async def main(num_ctx: int | None) -> Any:
            async with OllamaBackend(MODEL, server.url, num_ctx=num_ctx) as b:
                return await b.complete(LONG_PROMPT, sampling=SAMPLING, stop=[])

        with pytest.raises(ContextOverflow) as info:
            run(main(256))
        assert info.value.context == 256
        assert "the server cut it to 256 tokens" in str(info.value)
        assert run(main(None)).prompt_tokens == 300  # the whole prompt: nothing to see


# --------------------------------------------------------------------------- the run


async def _pipeline(url: str, settings: PipelineSettings) -> tuple[list[Any], Pipeline]:
    prep = await prepare(build_config({"model": MODEL, "host": url}, environ={}))
    try:
        pipeline = Pipeline(prep.backend, prep.pre_query, seed=3, settings=settings)
        out: list[Any] = []
        try:
            async for r in pipeline.run(5):
                out.append(r)
        except MagpieError as exc:
            out.append(exc)
        return out, pipeline
    finally:
        await prep.backend.aclose()


def test_when_every_prompt_overflows_the_streak_says_how_to_raise_the_context() -> None:
    """Overflows are not failures (five in a row would end the run as
    "failed after their retries"): the reject streak ends it, with a line on
    the context and the backend's own way to raise it."""
    model = smollm2_model(ScriptedEngine())
    model.show["parameters"] += "\nnum_ctx                        8"  # the pre-query alone is more
    with OllamaTestServer([model]) as server:
        settings = PipelineSettings(max_reject_streak=8, max_failure_streak=2)
        out, pipeline = run(_pipeline(server.url, settings))
        requests = len(server.requests_to("/api/generate"))
    *rejections, error = out
    assert [r.reason for r in rejections] == [CONTEXT_OVERFLOW] * 8
    assert all(isinstance(r, Rejection) and r.stage == "request" for r in rejections)
    assert requests == 8  # one request an attempt: none retried
    assert isinstance(error, MagpieError) and "failed after their retries" not in str(error)
    message = str(error)
    assert message.startswith("the last 8 attempts were all rejected (context_overflow 8)")
    assert "do not fit the model's context" in message and "context 8)" in message
    assert "--num-ctx" in message and "PARAMETER num_ctx" in message
    assert pipeline.stats.rejected == {CONTEXT_OVERFLOW: 8}


# --------------------------------------------------------------------------- OpenAI-compatible


def test_llama_server_refuses_what_does_not_fit_and_stops_at_the_end() -> None:
    served = smollm2_served(ScriptedEngine(text_fn=lambda s, o: " ".join(_WORDS[:50])))
    with OpenAITestServer([served], flavor="llamacpp", context=100) as server:

        async def main() -> Any:
            async with OpenAIBackend(None, server.url) as b:
                with pytest.raises(ContextOverflow) as info:
                    await call_with_retry(
                        lambda: b.complete(LONG_PROMPT, sampling=SAMPLING, stop=[]),
                        RetryPolicy(backoff_base=0.0),
                    )
                end = await b.complete(" ".join(_WORDS[:80]), sampling=SAMPLING, stop=[])
                return info.value, end

        err, end = run(main())
        sent = len(server.requests_to("/v1/completions"))
    assert (err.prompt_tokens, err.context, err.retryable) == (300, 100, False)
    assert "exceeds the available context size" in str(err) and "llama-server -c" in str(err)
    assert sent == 2  # the over-long one once
    assert end.finish_reason == "length" and end.prompt_tokens + end.completion_tokens == 100


@pytest.mark.parametrize("legacy", [False, True])
def test_vllm_refuses_a_prompt_whose_answer_does_not_fit(legacy: bool) -> None:
    """vLLM counts the answer asked for: 60 prompt tokens and 64 max tokens do
    not fit 100."""
    served = smollm2_served(ScriptedEngine())
    with OpenAITestServer([served], flavor="vllm", context=100, legacy_errors=legacy) as server:

        async def main() -> ContextOverflow:
            async with OpenAIBackend(None, server.url) as b:
                with pytest.raises(ContextOverflow) as info:
                    await b.complete(" ".join(_WORDS[:60]), sampling=SAMPLING, stop=[])
                return info.value

        err = run(main())
    assert (err.prompt_tokens, err.context) == (60, 100)
    assert "--max-model-len" in str(err)


def test_num_ctx_is_a_usage_error_for_an_openai_compatible_server(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["generate", "--backend", "openai", "--num-ctx", "4096", "-o", str(tmp_path / "x.jsonl")],
    )
    assert result.exit_code == ExitStatus.USAGE
    assert "--num-ctx 4096: an OpenAI-compatible server fixes its context" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------- the setting


def test_num_ctx_from_every_source(tmp_path: Path) -> None:
    assert build_config({"num_ctx": 8192}, environ={}).generator_spec.num_ctx == 8192
    cfg = build_config({}, environ={"MAGPIE_NUM_CTX": "2048"})
    assert (cfg.num_ctx, cfg.judge_spec.num_ctx, cfg.guard_spec.num_ctx) == (2048, 2048, 2048)
    toml = tmp_path / "run.toml"
    toml.write_text("n_ctx = 1024\n")  # the embedded backend's setting's old name
    assert build_config({}, config_file=toml, environ={}).num_ctx == 1024
    toml.write_text("num_ctx = 3000\n")
    assert build_config({}, config_file=toml, environ={}).num_ctx == 3000
    assert build_config({}, environ={}).num_ctx is None


def test_num_ctx_sets_the_embedded_context() -> None:
    from magpie.backends.registry import EMBEDDED_N_CTX, _embedded

    assert _embedded(build_config({"num_ctx": 1024}, environ={}).generator_spec)._n_ctx == 1024
    assert _embedded(build_config({}, environ={}).generator_spec)._n_ctx == EMBEDDED_N_CTX


# --------------------------------------------------------------------------- what servers say


@pytest.mark.parametrize(
    ("status", "body", "counts"),
    [
        # Ollama 0.33, truncate false: llama-server's body as a string.
        (400, json.dumps({"error": context_error(2006, 512)}), (2006, 512)),
        (400, json.dumps({"error": PROMPT_TOO_LONG}), (None, None)),
        # llama-server.
        (400, json.dumps(json.loads(context_error(40, 32))), (40, 32)),
        # vLLM, recent and older, and its engine.
        (
            400,
            json.dumps(
                {
                    "error": {
                        "message": "You passed 5000 input tokens and requested 2048 output "
                        "tokens. However, the model's context length is only 4096 tokens, "
                        "resulting in a maximum input length of 2048 tokens. Please reduce "
                        "the length of the input prompt.",
                        "type": "BadRequestError",
                        "param": "input_tokens",
                        "code": 400,
                    }
                }
            ),
            (5000, 4096),
        ),
        (
            400,
            json.dumps(
                {
                    "object": "error",
                    "message": "This model's maximum context length is 4096 tokens. However, "
                    "you requested 10778 tokens (2778 in the messages, 8000 in the "
                    "completion). Please reduce the length of the messages or completion.",
                    "type": "BadRequestError",
                    "code": 400,
                }
            ),
            (2778, 4096),
        ),
        (
            400,
            '{"error":{"message":"\'max_tokens\' or \'max_completion_tokens\' is too large: '
            "8000. This model's maximum context length is 4096 tokens and your request has "
            '2778 input tokens (8000 > 4096 - 2778). None","type":"BadRequestError"}}',
            (2778, 4096),
        ),
        (
            400,
            '{"error":{"message":"The decoder prompt (length 5000) is longer than the maximum '
            "model length of 4096. Make sure that `max_model_len` is no smaller than the "
            'number of text tokens."}}',
            (5000, 4096),
        ),
        # SGLang.
        (
            400,
            '{"error":{"message":"The input (5000 tokens) is longer than the model\'s '
            'context length (4096 tokens)."}}',
            (5000, 4096),
        ),
    ],
)
def test_each_servers_overflow_is_read_with_its_counts(
    status: int, body: str, counts: tuple[int | None, int | None]
) -> None:
    found = context_overflow(status, body)
    assert found is not None
    assert (found.prompt_tokens, found.context) == counts


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, '{"error": "raw mode does not support template, system, or context"}'),
        (400, '{"error": {"message": "top_k must be -1 (disable), or at least 1, got 0."}}'),
        (500, json.dumps({"error": context_error(2006, 512)})),  # not the prompt's fault
        (503, '{"error": "server busy, please try again."}'),
    ],
)
def test_other_errors_are_no_overflow(status: int, body: str) -> None:
    assert context_overflow(status, body) is None


def test_the_double_cuts_as_ollama_does_when_asked_to() -> None:
    """Without truncate/shift (Ollama's defaults) the double cuts a prompt
    that does not fit as the real server does (first num_keep tokens and the
    end: 258 of 2001 tokens in a context of 512)."""
    assert cut_limit(512, 4) == 258
    with OllamaTestServer([small_context_model(100)]) as server:

        async def main() -> Any:
            import ollama

            client = ollama.AsyncClient(host=server.url)
            return await client.generate(
                MODEL, LONG_PROMPT, raw=True, options={"num_predict": 4}, stream=False
            )

        reply = run(main())
        assert reply.prompt_eval_count == cut_limit(100, 4) and server.cut_prompts == 1
