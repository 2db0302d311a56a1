"""The Ollama-protocol test server, driven by the real ``ollama`` client over HTTP.

Generation tests run the real SmolLM2-135M-Instruct model (loaded once per
process); protocol, fault and concurrency tests use the scripted engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest
from ollama_server import (
    BUSY,
    FIXTURES_DIR,
    RAW_CONFLICT,
    SMOLLM2_SYSTEM,
    Delay,
    DropConnection,
    EmptyResponse,
    HttpError,
    LlamaEngine,
    MidStreamError,
    OllamaTestServer,
    ScriptedEngine,
    TestModel,
    embedding_model,
    load_fixture_model,
    parse_parameters,
    smollm2_model,
    word_embedding,
)

MODEL = "smollm2:135m"
# What SmolLM2's chat template renders before the user's text (default system included).
PRE_QUERY = f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n"
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "ollama_server.py"


def sampling(seed: int | None = 1, num_predict: int = 24, **extra: object) -> dict[str, object]:
    """Instruction-style options: T 1.0, a small token budget, Magpie's stop strings."""
    options: dict[str, object] = {
        "temperature": 1.0,
        "top_p": 1.0,
        "num_predict": num_predict,
        "stop": ["<|im_end|>", "<|im_start|>"],
        **extra,
    }
    if seed is not None:
        options["seed"] = seed
    return options


@pytest.fixture(scope="module")
def llama_server():
    """A server backed by the real SmolLM2 model (the GGUF loads once per process)."""
    with OllamaTestServer([smollm2_model(LlamaEngine())]) as srv:
        yield srv


@pytest.fixture()
def real(llama_server: OllamaTestServer):
    """The real-model server with a clean request log, and a client for it."""
    llama_server.clear_requests()
    llama_server.clear_faults()
    with ollama.Client(host=llama_server.url, timeout=120) as client:
        yield llama_server, client


@pytest.fixture()
def scripted():
    """A fresh scripted-engine server and a client for it."""
    with (
        OllamaTestServer([smollm2_model(ScriptedEngine())]) as srv,
        ollama.Client(host=srv.url, timeout=10) as client,
    ):
        yield srv, client


def echo_server(**kwargs: object) -> OllamaTestServer:
    """A server whose text is the JSON of what the engine received."""

    def text_fn(source: object, options: object) -> str:
        # "<" escaped (as Go does) so the model's stop strings cannot cut the JSON
        return json.dumps({"source": source, "options": options}).replace("<", "\\u003c")

    return OllamaTestServer([smollm2_model(ScriptedEngine(text_fn=text_fn))], **kwargs)


# --------------------------------------------------------------------------- real model


def test_raw_generate_non_streaming(real):
    srv, client = real
    r = client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=7))
    assert r.done is True
    assert r.done_reason in ("stop", "length")
    assert r.response.strip(), "the model wrote nothing"
    assert "<|im_end|>" not in r.response
    assert r.context is None, "raw responses carry no context"
    assert r.prompt_eval_count and r.prompt_eval_count > 10
    assert r.eval_count and 0 < r.eval_count <= 24
    assert r.total_duration and r.total_duration >= (r.eval_duration or 0) > 0
    (req,) = srv.requests_to("/api/generate")
    assert req.body["raw"] is True
    assert req.body["options"]["seed"] == 7 and req.body["options"]["num_predict"] == 24
    assert "temperature" not in req.body and "seed" not in req.body


def test_streaming_matches_non_streaming_for_a_seed(real):
    _, client = real
    whole = client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=11))
    parts = list(client.generate(MODEL, PRE_QUERY, raw=True, stream=True, options=sampling(11)))
    assert len(parts) >= 3
    assert all(p.done is False for p in parts[:-1])
    final = parts[-1]
    assert final.done is True and final.response == ""
    assert final.done_reason == whole.done_reason
    assert final.eval_count == whole.eval_count
    assert final.prompt_eval_count == whole.prompt_eval_count
    assert "".join(p.response for p in parts) == whole.response


def test_streaming_is_ndjson_over_http(real):
    srv, _ = real
    body = {"model": MODEL, "prompt": PRE_QUERY, "raw": True, "options": sampling(seed=3)}
    with httpx.stream("POST", f"{srv.url}/api/generate", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_count"):
        assert isinstance(lines[-1][key], int)
    assert all(line["done"] is False and "response" in line for line in lines[:-1])


@pytest.mark.slow
def test_same_seed_same_text_different_seeds_differ(real):
    _, client = real
    first = client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=42)).response
    again = client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=42)).response
    assert first == again
    others = {
        client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=s)).response
        for s in (1, 2, 3)
    }
    assert others - {first}, "three other seeds all reproduced seed 42's text"


def test_unset_seed_varies(real):
    _, client = real
    texts = {
        client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=None)).response
        for _ in range(3)
    }
    assert len(texts) > 1


def test_num_predict_gives_length(real):
    _, client = real
    r = client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=5, num_predict=4))
    assert r.done_reason == "length"
    assert r.eval_count == 4
    assert 0 < len(r.response.split()) <= 4


def test_stop_string_cuts_the_text(real):
    _, client = real
    options = sampling(seed=9, num_predict=32, stop=[])
    full = client.generate(MODEL, PRE_QUERY, raw=True, options=options).response
    words = full.split()
    assert len(words) >= 4, full
    stop_word = words[3]
    options["stop"] = [stop_word]
    cut = client.generate(MODEL, PRE_QUERY, raw=True, options=options)
    assert cut.done_reason == "stop"
    assert stop_word not in cut.response
    assert cut.response == full[: full.index(stop_word)]


@pytest.mark.slow
def test_greedy_chat(real):
    srv, client = real
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    options = {"temperature": 0, "num_predict": 24}
    r = client.chat(MODEL, messages, options=options)
    assert r.message.role == "assistant"
    assert r.message.content.strip()
    assert "<|im_end|>" not in r.message.content
    assert r.done_reason in ("stop", "length")
    again = client.chat(MODEL, messages, options=options)
    assert again.message.content == r.message.content, "temperature 0 is greedy"
    parts = list(client.chat(MODEL, messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done is True and parts[-1].done_reason == r.done_reason
    assert len(srv.requests_to("/api/chat")) == 3


def test_templated_generate_answers_with_context(real):
    _, client = real
    r = client.generate(MODEL, "What is 2+2?", options={"temperature": 0, "num_predict": 24})
    assert r.response.strip()
    assert r.context, "templated generate returns a context"
    assert r.done_reason in ("stop", "length")


def test_async_client_real_model(llama_server):
    async def run() -> list[str]:
        client = ollama.AsyncClient(host=llama_server.url, timeout=120)
        jobs = [
            client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(seed=s, num_predict=12))
            for s in (21, 22)
        ]
        return [r.response for r in await asyncio.gather(*jobs)]

    texts = asyncio.run(run())
    assert all(t.strip() for t in texts)


def test_ps_lists_the_loaded_model(real):
    _, client = real
    client.generate(MODEL, PRE_QUERY, raw=True, options=sampling(num_predict=2))
    assert [m.model for m in client.ps().models] == [MODEL]


# --------------------------------------------------------------------------- protocol


def test_root_version_tags(scripted):
    srv, client = scripted
    root = httpx.get(srv.url + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert root.http_version == "HTTP/1.1" and root.headers.get("connection") != "close"
    assert httpx.head(srv.url + "/").status_code == 200
    assert httpx.get(srv.url + "/api/version").json()["version"]
    (model,) = client.list().models
    assert model.model == MODEL
    assert model.details is not None and model.details.family
    assert httpx.get(srv.url + "/api/nope").status_code == 404


def test_show_template_parameters_and_system(scripted):
    srv, client = scripted
    show = client.show(MODEL)
    assert "<|im_start|>" in (show.template or "")
    assert parse_parameters(show.parameters or "")["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert show.modelinfo is not None and "general.architecture" in show.modelinfo
    assert show.details is not None and show.details.family
    assert not hasattr(show, "system"), "the client drops system: read it raw"
    raw = httpx.post(srv.url + "/api/show", json={"model": MODEL}).json()
    assert raw["system"] == SMOLLM2_SYSTEM


@pytest.mark.parametrize("call", ["show", "generate", "chat", "embed"])
def test_unknown_model_is_404(scripted, call):
    _, client = scripted
    with pytest.raises(ollama.ResponseError) as info:
        if call == "show":
            client.show("nope:1b")
        elif call == "generate":
            client.generate("nope:1b", "hi")
        elif call == "chat":
            client.chat("nope:1b", [{"role": "user", "content": "hi"}])
        else:
            client.embed("nope:1b", "hi")
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope:1b' not found"


def test_raw_with_system_is_400(scripted):
    srv, client = scripted
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(MODEL, PRE_QUERY, raw=True, system="You are terse.")
    assert info.value.status_code == 400
    assert info.value.error == RAW_CONFLICT
    for extra in ({"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        body = {"model": MODEL, "prompt": "x", "raw": True, **extra}
        resp = httpx.post(srv.url + "/api/generate", json=body)
        assert resp.status_code == 400 and resp.json() == {"error": RAW_CONFLICT}


def test_bad_requests_are_400(scripted):
    srv, _ = scripted
    malformed = httpx.post(srv.url + "/api/generate", content=b"{not json")
    assert malformed.status_code == 400 and malformed.json()["error"]
    missing = httpx.post(srv.url + "/api/generate", json={"prompt": "hi"})
    assert missing.status_code == 404 and missing.json()["error"] == "model '' not found"
    empty = httpx.post(srv.url + "/api/chat")
    assert empty.status_code == 400


def test_empty_prompt_loads(scripted):
    srv, client = scripted
    r = client.generate(MODEL, "")
    assert r.done and r.done_reason == "load" and r.response == ""
    c = httpx.post(srv.url + "/api/chat", json={"model": MODEL, "messages": []}).json()
    assert c["done_reason"] == "load"
    unload = client.generate(MODEL, "", keep_alive=0)
    assert unload.done_reason == "unload"
    assert client.ps().models == []


def test_model_name_latest_is_implicit():
    model = smollm2_model(ScriptedEngine())
    llama3 = TestModel("llama3:latest", {"template": ""}, {}, ScriptedEngine())
    with OllamaTestServer([model, llama3]) as srv:
        client = ollama.Client(host=srv.url, timeout=10)
        assert client.generate("llama3", "hi").response
        with pytest.raises(ollama.ResponseError):
            client.generate("smollm2", "hi")  # smollm2 means smollm2:latest


def test_top_level_sampling_is_ignored(scripted):
    srv, client = scripted
    body = {"model": MODEL, "prompt": "<|im_start|>user\n", "raw": True, "stream": False}
    top = [
        httpx.post(srv.url + "/api/generate", json={**body, "seed": 5, "temperature": 0}).json()
        for _ in range(2)
    ]
    assert top[0]["response"] != top[1]["response"], "top-level seed must not apply"
    nested = [
        client.generate(MODEL, "<|im_start|>user\n", raw=True, options={"seed": 5}).response
        for _ in range(2)
    ]
    assert nested[0] == nested[1]
    assert srv.requests_to("/api/generate")[0].body["seed"] == 5, "the log keeps what was sent"


def test_options_merge_with_modelfile_parameters():
    with echo_server() as srv:
        client = ollama.Client(host=srv.url, timeout=10)
        default = json.loads(client.generate(MODEL, "x", raw=True).response)
        assert default["options"]["stop"] == ["<|im_start|>", "<|im_end|>"]
        mine = json.loads(client.generate(MODEL, "x", raw=True, options={"stop": ["\n"]}).response)
        assert mine["options"]["stop"] == ["\n"], "a request stop list replaces the model's"


def test_default_system_is_rendered(scripted):
    with echo_server() as srv:
        client = ollama.Client(host=srv.url, timeout=10)
        chat = json.loads(client.chat(MODEL, [{"role": "user", "content": "hi"}]).message.content)
        assert chat["source"][0] == {"role": "system", "content": SMOLLM2_SYSTEM}
        own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        chat = json.loads(client.chat(MODEL, own).message.content)
        assert [m["content"] for m in chat["source"]] == ["Be brief.", "hi"]
        gen = json.loads(client.generate(MODEL, "hi").response)
        assert gen["source"] == [
            {"role": "system", "content": SMOLLM2_SYSTEM},
            {"role": "user", "content": "hi"},
        ]
        gen = json.loads(client.generate(MODEL, "hi", system="Be brief.").response)
        assert gen["source"][0]["content"] == "Be brief."
        raw = json.loads(client.generate(MODEL, "hi", raw=True).response)
        assert raw["source"] == "hi"


def test_scripted_engine_text(scripted):
    _, client = scripted
    ask = client.generate(MODEL, "<|im_start|>user\n", raw=True, options={"seed": 1})
    assert ask.response.endswith("?") and ask.done_reason == "stop"
    answer = client.generate(
        MODEL, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", raw=True
    )
    assert answer.response.startswith("Answer ")
    cut = client.generate(MODEL, "<|im_start|>user\n", raw=True, options={"num_predict": 2})
    assert cut.done_reason == "length" and len(cut.response.split()) == 2 and cut.eval_count == 2
    chat = client.chat(MODEL, [{"role": "user", "content": "hi"}], options={"stop": ["."]})
    assert chat.message.content.startswith("Answer ") and "." not in chat.message.content
    greedy = {
        client.generate(MODEL, "<|im_start|>user\n", raw=True, options={"temperature": 0}).response
        for _ in range(3)
    }
    assert len(greedy) == 1, "temperature 0 is deterministic"


def test_format_schema_scripted(scripted):
    _, client = scripted
    schema = {
        "type": "object",
        "properties": {
            "quality": {"enum": ["poor", "good"]},
            "score": {"type": "integer"},
        },
        "required": ["quality", "score"],
    }
    r = client.generate(MODEL, "Rate this.", format=schema, options={"temperature": 0})
    data = json.loads(r.response)
    assert data["quality"] in ("poor", "good") and isinstance(data["score"], int)


def test_embed_is_a_deterministic_bag_of_words():
    with (
        OllamaTestServer([embedding_model("nomic-embed-text", ScriptedEngine())]) as srv,
        ollama.Client(host=srv.url, timeout=10) as client,
    ):
        r = client.embed("nomic-embed-text", ["hello world", "the sea", "World, hello!"])
    first, second, third = r.embeddings
    assert first == third != second  # the same words, in any order and case
    assert first == word_embedding("hello world")
    assert len(first) == len(word_embedding("x"))
    assert abs(sum(v * v for v in first) - 1.0) < 1e-9


def test_a_generative_model_cannot_embed(scripted):
    """As Ollama 0.33 answers (its runner was not started for embeddings)."""
    _, client = scripted
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(MODEL, ["x"])
    assert info.value.status_code == 501 and "--embeddings" in info.value.error


def test_requests_are_recorded_and_counted(scripted):
    srv, client = scripted
    client.generate(MODEL, "a", raw=True, options={"num_predict": 3})
    client.list()
    assert [(r.method, r.path) for r in srv.requests] == [
        ("POST", "/api/generate"),
        ("GET", "/api/tags"),
    ]
    assert srv.requests[0].body["options"] == {"num_predict": 3}
    assert srv.served["/api/generate"] == 1 and srv.served["/api/tags"] == 1
    srv.clear_requests()
    assert srv.requests == [] and not srv.served


def test_async_streaming_chat(scripted):
    srv, _ = scripted

    async def run() -> list[ollama.ChatResponse]:
        client = ollama.AsyncClient(host=srv.url, timeout=10)
        messages = [{"role": "user", "content": "hi"}]
        return [part async for part in await client.chat(MODEL, messages, stream=True)]

    parts = asyncio.run(run())
    assert len(parts) > 2 and parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content for p in parts).startswith("Answer ")


# --------------------------------------------------------------------------- faults


def test_http_error_fault_then_recovery(scripted):
    srv, client = scripted
    srv.inject(HttpError(503, BUSY), times=2, path="/api/generate")
    client.list()  # other paths are not affected
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(MODEL, "x", raw=True)
        assert info.value.status_code == 503 and info.value.error == BUSY
    assert client.generate(MODEL, "x", raw=True).response


def test_faults_are_fifo(scripted):
    srv, client = scripted
    srv.inject(HttpError(429, "too many requests"))
    srv.inject(HttpError(500, "boom"))
    codes = []
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as info:
            client.chat(MODEL, [{"role": "user", "content": "x"}])
        codes.append(info.value.status_code)
    assert codes == [429, 500]


def test_mid_stream_error(scripted):
    srv, client = scripted
    srv.inject(MidStreamError("model runner crashed"), path="/api/generate")
    seen = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in client.generate(MODEL, "<|im_start|>user\n", raw=True, stream=True):
            seen.append(part.response)
    assert seen and seen[0], "a partial chunk arrives before the error"
    assert info.value.error == "model runner crashed" and info.value.status_code == -1
    srv.inject(MidStreamError("model runner crashed"))
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(MODEL, "x", raw=True)
    assert info.value.status_code == 500


def test_empty_response_fault(scripted):
    srv, client = scripted
    srv.inject(EmptyResponse())
    r = client.generate(MODEL, "<|im_start|>user\n", raw=True)
    assert r.response == "" and r.done_reason == "stop" and r.done
    assert client.generate(MODEL, "<|im_start|>user\n", raw=True).response


def test_drop_connection(scripted):
    srv, client = scripted
    srv.inject(DropConnection(), path="/api/generate")
    with pytest.raises(httpx.RemoteProtocolError):
        client.generate(MODEL, "x", raw=True)
    assert client.generate(MODEL, "x", raw=True).response
    assert len(srv.requests_to("/api/generate")) == 2
    assert srv.served["/api/generate"] == 1


def test_delay_trips_the_client_timeout(scripted):
    srv, _ = scripted
    srv.inject(Delay(2.0))
    client = ollama.Client(host=srv.url, timeout=0.3)
    with pytest.raises(httpx.TimeoutException):
        client.generate(MODEL, "x", raw=True)
    assert client.generate(MODEL, "x", raw=True).response


def test_stopped_server_refuses_and_restarts_on_same_port(scripted):
    srv, client = scripted
    assert client.generate(MODEL, "x", raw=True).response  # a pooled keep-alive connection
    port = srv.port
    srv.stop()
    with pytest.raises(ConnectionError):
        client.generate(MODEL, "x", raw=True)
    with pytest.raises(ConnectionError):
        ollama.Client(host=srv.url, timeout=5).list()
    srv.start()
    assert srv.port == port
    assert client.generate(MODEL, "x", raw=True).response


# --------------------------------------------------------------------------- concurrency


async def _batch(url: str, n: int) -> None:
    client = ollama.AsyncClient(host=url, timeout=30)
    await asyncio.gather(*(client.generate(MODEL, f"p{i}", raw=True) for i in range(n)))


@pytest.mark.parametrize("slots", [None, 2])
def test_slots_bound_parallel_generations(slots):
    """4 concurrent requests of 0.5 s each: all run at once unbounded, 2 at a
    time with 2 slots (counted by the server, not timed)."""
    engine = ScriptedEngine(latency=0.5)
    with OllamaTestServer([smollm2_model(engine)], slots=slots) as srv:
        asyncio.run(_batch(srv.url, 4))
        assert srv.peak_concurrency == (slots or 4)
        assert srv.served["/api/generate"] == 4


def test_max_queue_answers_503():
    engine = ScriptedEngine(latency=0.4)
    with OllamaTestServer([smollm2_model(engine)], slots=1, max_queue=1) as srv:
        errors: list[int] = []

        def call() -> None:
            try:
                ollama.Client(host=srv.url, timeout=10).generate(MODEL, "x", raw=True)
            except ollama.ResponseError as exc:
                errors.append(exc.status_code)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert errors == [503]


# --------------------------------------------------------------------------- fixtures, CLI


def test_load_fixture_model(tmp_path):
    show = {
        "modelfile": 'FROM x\nSYSTEM """Be kind."""\n',
        "parameters": 'stop "<|eot_id|>"\ntemperature 0.6',
        "template": "{{ .Prompt }}",
        "details": {"family": "llama"},
        "model_info": {"general.architecture": "llama"},
        "capabilities": ["completion"],
        "modified_at": "2025-01-01T00:00:00Z",
    }
    tags = {"name": "llama3:8b", "model": "llama3:8b", "size": 1, "digest": "d", "details": {}}
    fixture = tmp_path / "llama3.json"
    fixture.write_text(json.dumps({"name": "llama3:8b", "show": show, "tags": tags}))
    model = load_fixture_model(fixture, ScriptedEngine())
    assert model.name == "llama3:8b"
    assert model.system == "Be kind."
    assert model.parameters == {"stop": ["<|eot_id|>"], "temperature": 0.6}
    with OllamaTestServer([model]) as srv:
        raw = httpx.post(srv.url + "/api/show", json={"model": "llama3:8b"}).json()
        assert raw["system"] == "Be kind."


@pytest.mark.parametrize(
    "fixture",
    sorted(FIXTURES_DIR.glob("*.json")) if FIXTURES_DIR.is_dir() else [],
    ids=lambda p: p.stem,
)
def test_project_fixtures_are_served(fixture):
    model = load_fixture_model(fixture, ScriptedEngine())
    with OllamaTestServer([model]) as srv:
        client = ollama.Client(host=srv.url, timeout=10)
        assert client.show(model.name).template == model.show["template"]
        assert [m.model for m in client.list().models] == [model.name]
        assert client.generate(model.name, "hi", raw=True).done
        raw_show = httpx.post(srv.url + "/api/show", json={"model": model.name}).json()
        assert raw_show.get("system") == model.show.get("system")


def test_cli_serves_until_sigterm():
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--port", "0", "--engine", "scripted"]
        + ["--slots", "2", "--models", "smollm2,llama3"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        client = ollama.Client(host=url, timeout=10)
        assert [m.model for m in client.list().models] == [MODEL, "llama3:8b"]
        assert client.generate(MODEL, "<|im_start|>user\n", raw=True).response
        assert "<|eot_id|>" in (client.show("llama3:8b").template or "")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
