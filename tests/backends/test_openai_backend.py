"""The OpenAI-compatible backend through the Backend contract, over real HTTP.

The server is :mod:`openai_server` in two flavors: ``llamacpp`` (``/props``
with the GGUF chat template; the real SmolLM2 model where the subject is
generation) and ``vllm`` (no template exposed; the scripted engine where the
subject is the wire format or an error).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from ollama_server import SMOLLM2_SYSTEM
from openai_server import (
    SMOLLM2_ID,
    CutStream,
    Delay,
    DropConnection,
    EmptyResponse,
    HttpError,
    LlamaEngine,
    MidStreamError,
    OpenAITestServer,
    PacedEngine,
    ScriptedEngine,
    ServedModel,
    smollm2_served,
    tokenize,
)

from conftest import free_port
from magpie.backends.base import Completion, Sampling
from magpie.backends.openai import (
    OpenAIBackend,
    error_message,
    normalize_host,
    resolve_host,
    sampling_fields,
)
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import (
    BackendError,
    BackendUnavailable,
    ModelNotFound,
    TemplateError,
    UsageError,
)
from magpie.pipeline.scheduler import Pipeline, PipelineSettings
from magpie.records import Record
from magpie.templates import jinja, resolve_pre_query

T = TypeVar("T")

#: What SmolLM2's chat template renders before a user's words (default system included).
PRE_QUERY = f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n"
STOP = ["<|im_end|>", "<|im_start|>"]
SHORT = Sampling(temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=12)
GREEDY = SHORT.model_copy(update={"temperature": 0.0})
#: For scripted replies compared with the engine's whole text: no token limit hit.
LONG = SHORT.model_copy(update={"max_tokens": 200})


def go(
    url: str, fn: Callable[[OpenAIBackend], Awaitable[T]], model: str | None = SMOLLM2_ID, **kw: Any
) -> T:
    """Open a backend on ``url``, await ``fn(backend)``, close it."""

    async def main() -> T:
        backend = OpenAIBackend(model, url, **kw)
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def scripted_text(source: str | list[dict[str, Any]], **options: Any) -> str:
    """What the scripted engine generates for a prompt (or messages) and options."""
    engine = ScriptedEngine()
    gen = (
        engine.generate(source, options)
        if isinstance(source, str)
        else engine.chat(source, options)
    )
    return "".join(gen)


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture(scope="module")
def llama_server() -> Iterator[OpenAITestServer]:
    """llama.cpp-style server running the real SmolLM2-135M-Instruct.

    One thread: on this shared 2-core machine a second llama thread mostly
    waits for the first (measured 3x slower under load).
    """
    served = smollm2_served(LlamaEngine(n_threads=1))
    with OpenAITestServer([served], flavor="llamacpp") as srv:
        yield srv


@pytest.fixture()
def real(llama_server: OpenAITestServer) -> OpenAITestServer:
    llama_server.clear_requests()
    llama_server.clear_faults()
    return llama_server


@pytest.fixture()
def vllm() -> Iterator[OpenAITestServer]:
    """vLLM-style server (no /props) with SmolLM2's id and the scripted engine."""
    with OpenAITestServer([smollm2_served(ScriptedEngine())], flavor="vllm") as srv:
        yield srv


# --------------------------------------------------------------------------- real model


def test_raw_completion_sends_the_prompt_as_is(real: OpenAITestServer) -> None:
    async def twice(b: OpenAIBackend) -> tuple[Completion, Completion]:
        first = await b.complete(PRE_QUERY, sampling=SHORT, stop=STOP, seed=7)
        return first, await b.complete(PRE_QUERY, sampling=SHORT, stop=STOP, seed=7)

    first, second = go(real.url, twice)
    [req, _] = real.requests_to("/v1/completions")
    assert req.body == {
        "model": SMOLLM2_ID,
        "prompt": PRE_QUERY,
        "max_tokens": 12,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "seed": 7,
        "stop": STOP,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "Authorization" not in req.headers
    assert first.text.strip() and not any(s in first.text for s in STOP)
    assert first.finish_reason in ("stop", "length")
    # No chat template around the prompt: the server counted exactly its tokens.
    assert first.prompt_tokens == len(tokenize(smollm2_served(), PRE_QUERY, True))
    assert 0 < (first.completion_tokens or 0) <= 12
    if first.finish_reason == "length":
        assert first.completion_tokens == 12
    assert second == first  # same seed, same sample


def test_chat_applies_the_server_template(real: OpenAITestServer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    c = go(real.url, lambda b: b.chat(messages, sampling=GREEDY, seed=1))
    [req] = real.requests_to("/v1/chat/completions")
    assert req.body["messages"] == messages and "prompt" not in req.body
    assert req.body["temperature"] == 0.0 and req.body["max_tokens"] == 12
    assert req.body["stream"] is True and "response_format" not in req.body
    assert c.text.strip() and "<|im_" not in c.text
    model = smollm2_served()
    rendered = jinja.render_chat_template(
        model.chat_template or "", messages, bos_token=model.bos_token, eos_token=model.eos_token
    )
    assert rendered.startswith(PRE_QUERY)  # the default system block, server side
    assert c.prompt_tokens == len(tokenize(model, rendered, False))
    assert c.finish_reason in ("stop", "length") and c.completion_tokens


def test_json_schema_constrains_the_real_model(real: OpenAITestServer) -> None:
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer"}},
        "required": ["score"],
    }
    messages = [{"role": "user", "content": "Rate the number 3 from 1 to 5. Answer in JSON."}]
    sampling = GREEDY.model_copy(update={"max_tokens": 24})
    c = go(real.url, lambda b: b.chat(messages, sampling=sampling, json_schema=schema))
    [req] = real.requests_to("/v1/chat/completions")
    assert req.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema, "strict": True},
    }
    assert c.finish_reason == "stop"
    assert isinstance(json.loads(c.text)["score"], int)


def test_describe_with_props_derives_the_pre_query(real: OpenAITestServer) -> None:
    info = go(real.url, lambda b: b.describe(), model=None)
    model = smollm2_served()
    assert info.backend == "openai" and info.model == SMOLLM2_ID and info.host == real.url
    assert info.template == model.chat_template and info.template_kind == "jinja"
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    # SmolLM2's GGUF does not add BOS: the probe must see that, or resolving
    # would strip the leading <|im_start|> as if it were a BOS token.
    assert info.adds_bos is False and info.extra["adds_bos_probed"] is True
    assert info.extra["server"] == "llama.cpp"
    pq = resolve_pre_query("auto", info)
    assert pq.text == PRE_QUERY and pq.source == "gguf-jinja"
    assert "<|im_end|>" in pq.stop
    paths = [r.path for r in real.requests]
    assert paths[:2] == ["/v1/models", "/props"] and paths.count("/tokenize") == 2


def test_complete_n_real_model_one_request(real: OpenAITestServer) -> None:
    sampling = SHORT.model_copy(update={"max_tokens": 8})
    out = go(real.url, lambda b: b.complete_n(PRE_QUERY, 3, sampling=sampling, stop=STOP, seed=5))
    [req] = real.requests_to("/v1/completions")
    assert req.body["n"] == 3 and req.body["prompt"] == PRE_QUERY
    assert len(out) == 3 and all(c.text.strip() for c in out)
    assert len({c.text for c in out}) == 3  # n samples, not one repeated
    assert all(c.finish_reason in ("stop", "length") for c in out)
    assert all(0 < (c.completion_tokens or 0) <= 8 for c in out)
    assert {c.prompt_tokens for c in out} == {len(tokenize(smollm2_served(), PRE_QUERY, True))}


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_real_model(real: OpenAITestServer) -> None:
    short = Sampling(temperature=1.0, top_p=1.0, top_k=0, repeat_penalty=1.0, max_tokens=48)
    settings = PipelineSettings(
        instruction=short,
        response=short.model_copy(update={"temperature": 0.0, "max_tokens": 16}),
        keep_truncated=True,
    )

    async def generate(b: OpenAIBackend) -> list[Record]:
        pq = resolve_pre_query("auto", await b.describe())
        pipe = Pipeline(b, pq, seed=42, settings=settings)
        return [r async for r in pipe.run(2) if isinstance(r, Record)]

    records = go(real.url, generate, model=None)
    assert len(records) == 2
    for rec in records:
        assert rec.backend == "openai" and rec.model == SMOLLM2_ID and rec.host == real.url
        assert rec.template.startswith("gguf-jinja") and rec.instruction and rec.response
        assert [m.role for m in rec.messages] == ["user", "assistant"]
        assert (
            rec.instruction_generation.prompt_tokens and rec.response_generation.completion_tokens
        )
    raw = real.requests_to("/v1/completions")
    assert raw and all(r.body["prompt"] == PRE_QUERY for r in raw)
    chats = real.requests_to("/v1/chat/completions")
    asked = [r.body["messages"][0]["content"] for r in chats]
    assert all(rec.instruction in asked for rec in records)


# --------------------------------------------------------------------------- wire format


def test_streaming_assembles_every_chunk(vllm: OpenAITestServer) -> None:
    messages = [{"role": "user", "content": "Explain tides."}]
    sampling = SHORT.model_copy(update={"max_tokens": 200})
    c = go(vllm.url, lambda b: b.chat(messages, sampling=sampling, seed=3))
    expected = scripted_text(messages, seed=3, temperature=1.0)
    assert c.text == expected and len(expected.split()) > 20
    assert c.finish_reason == "stop"
    assert c.completion_tokens == len(expected.split())  # from the usage chunk


def test_finish_reasons(vllm: OpenAITestServer) -> None:
    tiny = SHORT.model_copy(update={"max_tokens": 3})
    cut = go(vllm.url, lambda b: b.complete(PRE_QUERY, sampling=tiny, stop=STOP, seed=1))
    assert cut.finish_reason == "length" and cut.completion_tokens == 3
    assert cut.text == " ".join(scripted_text(PRE_QUERY, seed=1, temperature=1.0).split()[:3])

    full = scripted_text(PRE_QUERY, seed=1, temperature=1.0)
    stop_word = full.split()[2]
    stopped = go(
        vllm.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=[stop_word], seed=1)
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop_word)].rstrip()


class _FilteredEngine(ScriptedEngine):
    """Finishes with a reason other than stop/length (content_filter)."""

    def generate(self, prompt: str, options: Any, fmt: Any = None) -> Any:
        gen = super().generate(prompt, options, fmt)
        gen.done_reason = "content_filter"
        return gen


def test_other_finish_reasons_are_unknown() -> None:
    with OpenAITestServer([ServedModel("m", _FilteredEngine())]) as srv:
        c = go(srv.url, lambda b: b.complete("Hi", sampling=LONG, stop=[]), model="m")
    assert c.finish_reason == "unknown" and c.text


def test_usage_missing_counts_chunks() -> None:
    with OpenAITestServer([smollm2_served(ScriptedEngine())], usage=False) as srv:
        c = go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=LONG, stop=STOP, seed=2))
    expected = scripted_text(PRE_QUERY, seed=2, temperature=1.0, stop=STOP)
    assert c.text == expected
    assert c.prompt_tokens is None and c.completion_tokens == len(expected.split())


def test_server_that_ignores_stream() -> None:
    with OpenAITestServer([smollm2_served(ScriptedEngine())], ignore_stream=True) as srv:
        c = go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=LONG, stop=STOP, seed=2))
        messages = [{"role": "user", "content": "Hi"}]
        chat = go(srv.url, lambda b: b.chat(messages, sampling=SHORT, seed=2))
    assert c.text == scripted_text(PRE_QUERY, seed=2, temperature=1.0, stop=STOP)
    assert c.finish_reason == "stop" and c.prompt_tokens and c.completion_tokens
    assert chat.text == scripted_text(messages, seed=2, temperature=1.0, num_predict=12)
    assert chat.finish_reason == "length"


def test_json_schema_wire_format(vllm: OpenAITestServer) -> None:
    schema = {
        "type": "object",
        "properties": {"quality": {"type": "integer", "minimum": 1}, "why": {"type": "string"}},
        "required": ["quality", "why"],
    }
    messages = [{"role": "user", "content": "Judge this."}]
    c = go(vllm.url, lambda b: b.chat(messages, sampling=GREEDY, seed=0, json_schema=schema))
    [req] = vllm.requests_to("/v1/chat/completions")
    assert req.body["response_format"]["type"] == "json_schema"
    assert req.body["response_format"]["json_schema"]["schema"] == schema
    assert req.body["response_format"]["json_schema"]["strict"] is True
    reply = json.loads(c.text)
    assert isinstance(reply["quality"], int) and isinstance(reply["why"], str)


def test_sampling_fields() -> None:
    off = sampling_fields(Sampling(top_k=None, repeat_penalty=None, max_tokens=5), None, None)
    assert off == {"max_tokens": 5, "temperature": 1.0, "top_p": 1.0}
    on = sampling_fields(Sampling(top_k=50, repeat_penalty=1.1), 3, ["x"])
    assert on["top_k"] == 50 and on["repetition_penalty"] == on["repeat_penalty"] == 1.1
    assert on["seed"] == 3 and on["stop"] == ["x"]
    assert sampling_fields(Sampling(top_k=0), None, [])["top_k"] == -1
    # 1.0 is llama.cpp's default: no repeat_penalty (vLLM warns on unknown fields).
    assert "repeat_penalty" not in sampling_fields(Sampling(repeat_penalty=1.0), None, None)
    assert "stop" not in sampling_fields(Sampling(), None, [])


def test_top_k_none_is_left_out(vllm: OpenAITestServer) -> None:
    plain = Sampling(top_k=None, repeat_penalty=None, max_tokens=4)
    go(vllm.url, lambda b: b.complete(PRE_QUERY, sampling=plain, stop=STOP))
    [req] = vllm.requests_to("/v1/completions")
    assert not {"top_k", "repetition_penalty", "repeat_penalty", "seed"} & set(req.body)


# --------------------------------------------------------------------------- abort, timeouts


def test_abort_closes_the_stream() -> None:
    engine = PacedEngine([f"w{i} " for i in range(40)], interval=0.05)
    with OpenAITestServer([ServedModel("m", engine)]) as srv:
        c = go(
            srv.url,
            lambda b: b.complete("go", sampling=SHORT, stop=[], abort=lambda t: len(t) >= 9),
            model="m",
        )
        assert engine.closed.wait(5)  # the server saw the client go and stopped
    assert c.finish_reason == "abort"
    assert c.text == "w0 w1 w2 " and c.completion_tokens == 3
    assert engine.emitted < 40


def test_abort_on_chat() -> None:
    engine = PacedEngine(["again "] * 40, interval=0.02)
    with OpenAITestServer([ServedModel("m", engine)]) as srv:
        c = go(
            srv.url,
            lambda b: b.chat(
                [{"role": "user", "content": "x"}],
                sampling=SHORT,
                abort=lambda t: t.count("again") >= 5,
            ),
            model="m",
        )
    assert c.finish_reason == "abort" and c.text == "again " * 5


def test_timeout_bounds_silence_not_length() -> None:
    engine = PacedEngine([f"p{i} " for i in range(6)], interval=0.25)
    with OpenAITestServer([ServedModel("m", engine)]) as srv:
        c = go(srv.url, lambda b: b.complete("go", sampling=SHORT, stop=[]), model="m", timeout=1.0)
        assert c.text == "p0 p1 p2 p3 p4 p5 " and c.finish_reason == "stop"
        srv.inject(Delay(3.0))
        with pytest.raises(BackendError) as err:
            go(srv.url, lambda b: b.complete("go", sampling=SHORT, stop=[]), model="m", timeout=0.5)
    assert err.value.retryable and err.value.cause == "timeout"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("legacy", [False, True], ids=["openai-errors", "legacy-vllm-errors"])
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (403, False), (422, False), (429, True), (500, True), (503, True)],
)
def test_http_status_mapping(status: int, retryable: bool, legacy: bool) -> None:
    served = [smollm2_served(ScriptedEngine())]
    with OpenAITestServer(served, legacy_errors=legacy) as srv:
        srv.inject(HttpError(status, f"told you {status}"))
        with pytest.raises(BackendError) as err:
            go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
    assert err.value.retryable is retryable
    assert err.value.cause == f"http_{status}"
    assert f"told you {status}" in str(err.value) and str(status) in str(err.value)


def test_401_asks_for_the_api_key(vllm: OpenAITestServer) -> None:
    vllm.inject(HttpError(401, "Invalid API Key"))
    with pytest.raises(BackendError) as err:
        go(vllm.url, lambda b: b.chat([{"role": "user", "content": "x"}], sampling=SHORT))
    assert not err.value.retryable and "set OPENAI_API_KEY" in str(err.value)
    assert "Invalid API Key" in str(err.value)


@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
def test_api_key(flavor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    served = [smollm2_served(ScriptedEngine())]
    with OpenAITestServer(served, flavor=flavor, api_key="sekrit") as srv:  # type: ignore[arg-type]
        with pytest.raises(BackendError) as err:
            go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
        assert err.value.cause == "http_401" and not err.value.retryable
        assert "set OPENAI_API_KEY" in str(err.value)
        assert "Authorization" not in srv.requests[-1].headers

        with pytest.raises(BackendError, match="refused: check OPENAI_API_KEY"):
            go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP), api_key="no")

        c = go(
            srv.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP), api_key="sekrit"
        )
        assert c.text
        monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
        info = go(srv.url, lambda b: b.describe())
        assert info.model == SMOLLM2_ID
        assert srv.requests[-1].headers["Authorization"] == "Bearer sekrit"


def test_unknown_model_is_model_not_found(vllm: OpenAITestServer) -> None:
    with pytest.raises(ModelNotFound) as err:
        go(vllm.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP), model="nope")
    assert "'nope'" in str(err.value) and "/v1/models" in str(err.value)
    assert "does not exist" in str(err.value)
    assert err.value.exit_status == 3


def test_missing_endpoint_is_not_model_not_found(vllm: OpenAITestServer) -> None:
    vllm.inject(HttpError(404, "Not Found"), path="/v1/completions")
    with pytest.raises(BackendError) as err:
        go(vllm.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
    assert not err.value.retryable and "/v1/completions" in str(err.value)


def test_refused_connection_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for call in (
        lambda b: b.complete("x", sampling=SHORT, stop=[]),
        lambda b: b.chat([{"role": "user", "content": "x"}], sampling=SHORT),
        lambda b: b.describe(),
    ):
        with pytest.raises(BackendUnavailable) as err:
            go(url, call)
        assert url in str(err.value) and "vllm serve" in str(err.value)
        assert "--host" in str(err.value) and err.value.exit_status == 3


@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
def test_mid_stream_error_is_retryable(flavor: str) -> None:
    served = [smollm2_served(ScriptedEngine())]
    with OpenAITestServer(served, flavor=flavor) as srv:  # type: ignore[arg-type]
        srv.inject(MidStreamError("CUDA out of memory"))
        with pytest.raises(BackendError) as err:
            go(srv.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
    assert err.value.retryable and err.value.cause == "stream_error"
    assert "CUDA out of memory" in str(err.value)


@pytest.mark.parametrize(
    ("fault", "cause"), [(CutStream(), "connection"), (DropConnection(), "connection")]
)
def test_broken_streams_are_retryable(vllm: OpenAITestServer, fault: Any, cause: str) -> None:
    vllm.inject(fault)
    with pytest.raises(BackendError) as err:
        go(vllm.url, lambda b: b.chat([{"role": "user", "content": "x"}], sampling=SHORT))
    assert err.value.retryable and err.value.cause == cause


def test_empty_reply_is_an_empty_completion(vllm: OpenAITestServer) -> None:
    vllm.inject(EmptyResponse())
    c = go(vllm.url, lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
    assert c.text == "" and c.finish_reason == "stop" and c.completion_tokens == 0


def test_retry_policy_cures_a_transient_error(vllm: OpenAITestServer) -> None:
    vllm.inject(HttpError(503, "overloaded"))
    causes: list[str] = []
    policy = RetryPolicy(backoff_base=0.0)

    async def attempt(b: OpenAIBackend) -> Completion:
        return await call_with_retry(
            lambda: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP, seed=4), policy, causes.append
        )

    c = go(vllm.url, attempt)
    assert causes == ["http_503"] and c.text
    assert len(vllm.requests_to("/v1/completions")) == 2


def test_error_message_shapes() -> None:
    assert error_message(b'{"error": {"message": "bad k", "code": 400}}') == "bad k"
    assert error_message(b'{"object": "error", "message": "old vllm", "code": 404}') == "old vllm"
    assert error_message(b'{"error": "Unauthorized"}') == "Unauthorized"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"Bad Gateway") == "Bad Gateway"


# --------------------------------------------------------------------------- describe


def test_describe_without_props_needs_a_named_template(vllm: OpenAITestServer) -> None:
    info = go(vllm.url, lambda b: b.describe())
    assert info.template is None and info.template_kind is None and info.bos_token is None
    assert "server" not in info.extra and info.extra["served_models"] == [SMOLLM2_ID]
    assert [r.path for r in vllm.requests if r.path == "/props"] == ["/props"]
    with pytest.raises(TemplateError, match="pass --template with one of"):
        resolve_pre_query("auto", info)
    assert resolve_pre_query("smollm2", info).text == PRE_QUERY


def test_props_that_is_not_llamacpp_is_ignored() -> None:
    """LM Studio answers unknown paths with 200 and an error object."""
    model = ServedModel("m", ScriptedEngine(), chat_template="{{ messages }}")
    with OpenAITestServer([model], flavor="llamacpp") as srv:
        srv.inject(HttpError(200, "Unexpected endpoint or method."), path="/props")
        info = go(srv.url, lambda b: b.describe(), model="m")
    assert info.template is None and "server" not in info.extra


@pytest.mark.parametrize("flavor", ["vllm", "llamacpp"])
@pytest.mark.parametrize("adds_bos", [True, False])
def test_describe_probes_bos(flavor: str, adds_bos: bool) -> None:
    model = ServedModel(
        "m", ScriptedEngine(), chat_template=None, bos_token="<s>", adds_bos=adds_bos
    )
    with OpenAITestServer([model], flavor=flavor) as srv:  # type: ignore[arg-type]
        info = go(srv.url, lambda b: b.describe(), model="m")
        assert info.adds_bos is adds_bos and info.extra["adds_bos_probed"] is True
        srv.inject(HttpError(404, "Not Found"), times=None, path="/tokenize")
        info = go(srv.url, lambda b: b.describe(), model="m")
    assert info.adds_bos is True and info.extra["adds_bos_probed"] is False


def test_describe_picks_the_first_model_and_checks_a_named_one() -> None:
    engine = ScriptedEngine()
    models = [ServedModel("org/first", engine), ServedModel("org/second", engine)]
    with OpenAITestServer(models) as srv:
        assert go(srv.url, lambda b: b.describe(), model=None).model == "org/first"
        assert go(srv.url, lambda b: b.describe(), model="org/second").model == "org/second"

        async def unnamed_complete(b: OpenAIBackend) -> tuple[str, Completion]:
            c = await b.complete("hello", sampling=SHORT, stop=[])
            return b.model, c

        name, _ = go(srv.url, unnamed_complete, model=None)
        assert name == "org/first"
        assert srv.requests_to("/v1/completions")[-1].body["model"] == "org/first"
        with pytest.raises(ModelNotFound) as err:
            go(srv.url, lambda b: b.describe(), model="org/third")
    assert "'org/third'" in str(err.value)
    assert "org/first, org/second" in str(err.value) and "/v1/models" in str(err.value)


def test_describe_on_a_server_without_v1_models(vllm: OpenAITestServer) -> None:
    vllm.inject(HttpError(404, "Not Found"), path="/v1/models")
    with pytest.raises(BackendError) as err:
        go(vllm.url, lambda b: b.describe())
    assert not err.value.retryable and "/v1/models" in str(err.value)
    assert "--host" in str(err.value)


# --------------------------------------------------------------------------- complete_n


def test_complete_n_one_request(vllm: OpenAITestServer) -> None:
    out = go(vllm.url, lambda b: b.complete_n(PRE_QUERY, 4, sampling=LONG, stop=STOP, seed=9))
    [req] = vllm.requests_to("/v1/completions")
    assert req.body["n"] == 4 and req.body["seed"] == 9 and req.body["stream"] is True
    expected = [scripted_text(PRE_QUERY, seed=9 + i, temperature=1.0, stop=STOP) for i in range(4)]
    assert [c.text for c in out] == expected and len(set(expected)) == 4
    assert all(c.finish_reason == "stop" for c in out)
    assert [c.completion_tokens for c in out] == [len(t.split()) for t in expected]
    assert all(c.prompt_tokens == out[0].prompt_tokens and c.prompt_tokens for c in out)


def test_complete_n_of_one_and_errors(vllm: OpenAITestServer) -> None:
    [one] = go(vllm.url, lambda b: b.complete_n(PRE_QUERY, 1, sampling=LONG, stop=STOP, seed=9))
    assert one.text == scripted_text(PRE_QUERY, seed=9, temperature=1.0, stop=STOP)
    with pytest.raises(ValueError):
        go(vllm.url, lambda b: b.complete_n(PRE_QUERY, 0, sampling=SHORT, stop=STOP))
    vllm.inject(HttpError(503, "busy"))
    with pytest.raises(BackendError) as err:
        go(vllm.url, lambda b: b.complete_n(PRE_QUERY, 3, sampling=SHORT, stop=STOP))
    assert err.value.retryable


# --------------------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
        ("localhost:8080", "http://localhost:8080"),
        ("https://gpu.example.com/proxy/v1", "https://gpu.example.com/proxy"),
    ],
)
def test_normalize_host(given: str, expected: str) -> None:
    assert normalize_host(given) == expected


@pytest.mark.parametrize("bad", ["", "ftp://x:1", "http://", "a host"])
def test_bad_host_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        normalize_host(bad)


def test_resolve_host(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_host(None) == "http://127.0.0.1:8000"  # vllm serve's default
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu1:8080/v1")
    assert resolve_host(None) == "http://gpu1:8080"
    assert resolve_host("gpu2:9000") == "http://gpu2:9000"


def test_host_with_v1_suffix_reaches_the_server(vllm: OpenAITestServer) -> None:
    c = go(vllm.url + "/v1", lambda b: b.complete(PRE_QUERY, sampling=SHORT, stop=STOP))
    assert c.text and vllm.requests_to("/v1/completions")


def test_many_requests_in_flight_at_once() -> None:
    """The connection pool does not cap concurrency (httpx's default is 100)."""
    served = [smollm2_served(ScriptedEngine(latency=1.0))]
    with OpenAITestServer(served) as srv:

        async def burst(b: OpenAIBackend) -> list[Completion]:
            calls = [b.complete(PRE_QUERY, sampling=SHORT, stop=STOP, seed=i) for i in range(120)]
            return await asyncio.gather(*calls)

        out = go(srv.url, burst)
        assert srv.peak_concurrency == 120
    assert len(out) == 120 and all(c.text for c in out)
