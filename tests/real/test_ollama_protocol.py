"""What magpie reads from Ollama, checked on the real server, and the test
double (tests/support/ollama_server.py) checked against it field by field."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from real_servers import RealOllama

from magpie.backends.base import Sampling
from magpie.backends.ollama import OllamaBackend
from magpie.pipeline.stages.clean import clean_instruction
from magpie.templates.rendered import render_pre_query

#: A raw prompt after which SmolLM2 writes " A" again and again, greedily:
#: Ollama's repeat guard (more than 30 equal tokens) ends it.
LOOP_PROMPT = (
    "<|im_start|>user\nWrite the letter A 100 times, separated by spaces.<|im_end|>\n"
    "<|im_start|>assistant\nA A A A A A A A A A"
)
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=120)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _complete(url: str, model: str, prompt: str, **kw: Any):  # type: ignore[no-untyped-def]
    async with OllamaBackend(model, url) as backend:
        return await backend.complete(prompt, sampling=GREEDY, stop=[], seed=1, **kw)


def test_repeat_guard_ends_a_stream_without_done(ollama: RealOllama):
    """Real Ollama ends the stream with HTTP 200, no done line and no error:
    that is the server cutting a loop, not a broken connection."""
    c = _run(_complete(ollama.url, "smollm2", LOOP_PROMPT))
    assert c.finish_reason == "repeat"
    assert c.text.split() == ["A"] * len(c.text.split()) and len(c.text.split()) >= 30
    assert clean_instruction(c, [])[1] == "repetition"

    # Through the official client's path, the same.
    async def official():  # type: ignore[no-untyped-def]
        async with OllamaBackend("smollm2", ollama.url, direct_stream=False) as b:
            return await b.complete(LOOP_PROMPT, sampling=GREEDY, stop=[], seed=1)

    assert _run(official()).finish_reason == "repeat"


def test_render_only_gives_the_pre_query(ollama: RealOllama):
    async def render(model: str, system: str | None = None):  # type: ignore[no-untyped-def]
        async with OllamaBackend(model, ollama.url) as b:
            return await render_pre_query(b, await b.describe(), system)

    pq = _run(render("smollm2"))
    assert pq.source == "ollama-render" and pq.name == "smollm2"
    assert pq.text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\n"
    )
    assert "<|im_end|>" in pq.stop and "<|im_start|>" in pq.stop
    assert pq.after_user == "<|im_end|>\n<|im_start|>assistant\n"
    assert pq.after_assistant == "<|im_end|>\n<|im_start|>user\n"
    pq = _run(render("smollm2", "You are a chef."))
    assert pq.text == "<|im_start|>system\nYou are a chef.<|im_end|>\n<|im_start|>user\n"
    pq = _run(render("llama3-on-smollm2"))
    assert pq.text == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert pq.name == "llama3" and "<|eot_id|>" in pq.stop
    pq = _run(render("smollm2-plain"))
    assert pq.text == "<|im_start|>user\n" and pq.system is None


# ----------------------------------------------------------------- parity


def _post(url: str, body: dict[str, Any]) -> tuple[int, str, list[Any]]:
    """(status, content type, the JSON lines of the body)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 - loopback
            status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    return status, ctype.split(";")[0], [json.loads(x) for x in raw.splitlines() if x.strip()]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _probes(model: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The requests magpie makes, and the failures it must read right."""
    opts = {"temperature": 0.0, "top_k": 0, "num_predict": 12, "seed": 3}
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    yield (
        "raw generate",
        "/api/generate",
        {"model": model, "prompt": chatml, "raw": True, "stream": True, "options": opts},
    )
    yield (
        "raw generate, stop",
        "/api/generate",
        {
            "model": model,
            "prompt": chatml,
            "raw": True,
            "stream": True,
            "options": {**opts, "num_predict": 200, "stop": ["."]},
        },
    )
    yield (
        "chat",
        "/api/chat",
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "options": opts,
        },
    )
    yield (
        "chat, format",
        "/api/chat",
        {
            "model": model,
            "stream": True,
            "options": {**opts, "num_predict": 40},
            "messages": [{"role": "user", "content": "Give a score."}],
            "format": {
                "type": "object",
                "properties": {"score": {"type": "integer"}},
                "required": ["score"],
            },
        },
    )
    yield (
        "not streamed",
        "/api/generate",
        {"model": model, "prompt": chatml, "raw": True, "stream": False, "options": opts},
    )
    yield (
        "repeat guard",
        "/api/generate",
        {
            "model": model,
            "prompt": LOOP_PROMPT,
            "raw": True,
            "stream": True,
            "options": {**opts, "num_predict": 120},
        },
    )
    yield (
        "repeat guard, not streamed",
        "/api/generate",
        {
            "model": model,
            "prompt": LOOP_PROMPT,
            "raw": True,
            "stream": False,
            "options": {**opts, "num_predict": 120},
        },
    )
    yield "missing model", "/api/generate", {"model": "no-such-model", "prompt": "x", "raw": True}
    yield (
        "missing model, chat",
        "/api/chat",
        {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    )
    yield "no model", "/api/generate", {"prompt": "x"}
    yield "bad options", "/api/generate", {"model": model, "prompt": "x", "options": "x"}
    yield "embed, generative model", "/api/embed", {"model": model, "input": ["x"]}


def _shape(name: str, status: int, ctype: str, lines: list[Any]) -> dict[str, Any]:
    """What magpie reads of a reply, and nothing it does not."""
    out: dict[str, Any] = {"status": status}
    if status >= 400:
        assert len(lines) == 1, (name, lines)
        out["error keys"] = sorted(lines[0])
        out["error is text"] = isinstance(lines[0].get("error"), str)
        return out
    out["content type"] = ctype
    *chunks, last = lines
    out["chunk keys"] = sorted({k for c in chunks for k in c if k != "created_at"})
    out["chunks done"] = sorted({c.get("done") for c in chunks}, key=str)
    out["last done"] = last.get("done")
    if last.get("done"):
        out["last keys"] = sorted(
            k for k in last if k in ("done_reason", "eval_count", "prompt_eval_count")
        )
        reason = last.get("done_reason")
        # Which of the two depends on the text, and greedy text differs
        # between llama.cpp builds; a limit of 200 tokens with stop "." is "stop".
        out["done_reason"] = reason if "stop" in name else reason in ("stop", "length")
    if "format" in name:
        text = "".join((c.get("message") or {}).get("content", "") for c in lines)
        out["json"] = sorted(json.loads(text))
    if "repeat" in name:
        pieces = [c.get("response", "") for c in lines]
        out["repeated"] = len([p for p in pieces if p.strip() == "A"])
    return out


@pytest.fixture(scope="module")
def double():  # type: ignore[no-untyped-def]
    from ollama_server import LlamaEngine, OllamaTestServer, smollm2_model

    model = smollm2_model(LlamaEngine(n_threads=1))
    with OllamaTestServer([model]) as srv:
        yield srv, model.name


def test_double_matches_the_real_server(ollama: RealOllama, double):  # type: ignore[no-untyped-def]
    srv, double_model = double
    diffs = []
    for name, path, body in _probes("smollm2"):
        real = _shape(name, *_post(ollama.url + path, body))
        dbody = dict(body)
        if dbody.get("model") == "smollm2":
            dbody["model"] = double_model
        ours = _shape(name, *_post(srv.url + path, dbody))
        if real != ours:
            diffs.append(f"{name}: real {real} != double {ours}")
    assert not diffs, "\n".join(diffs)


def test_show_and_tags_shapes_match(ollama: RealOllama, double):  # type: ignore[no-untyped-def]
    srv, double_model = double
    real = _post(ollama.url + "/api/show", {"model": "smollm2"})[2][0]
    ours = _post(srv.url + "/api/show", {"model": double_model})[2][0]
    read = ("template", "modelfile", "parameters", "details", "capabilities", "model_info")
    for key in read:
        assert (key in real) == (key in ours), key
    assert sorted(real["details"]) == sorted(ours["details"])
    real_tags, our_tags = _get(ollama.url + "/api/tags"), _get(srv.url + "/api/tags")
    assert sorted(real_tags["models"][0]) == sorted(our_tags["models"][0])
    assert set(_get(ollama.url + "/api/version")) == set(_get(srv.url + "/api/version"))


def test_the_double_renders_as_the_real_server(ollama: RealOllama) -> None:
    """``_debug_render_only`` (what magpie's pre-query comes from): the real
    server's reply and the double's with SmolLM2's rendering
    (``batch_helpers.chatml_render``) carry the same keys and the same
    ``rendered_template``, with and without a system message and over a
    conversation; the double's version is one that renders."""
    from batch_helpers import chatml_render
    from ollama_server import RENDER_VERSION, OllamaTestServer, ScriptedEngine, smollm2_model

    from magpie.backends.ollama.show import renders_templates

    model = smollm2_model(ScriptedEngine())
    model.render = chatml_render
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "You are a chef."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And then?"},
        ],
    ]
    with OllamaTestServer([model], version=RENDER_VERSION) as srv:
        assert renders_templates(_get(srv.url + "/api/version")["version"])
        for messages in chats:
            body = {"messages": messages, "stream": False, "_debug_render_only": True}
            real = _post(ollama.url + "/api/chat", {"model": "smollm2", **body})
            ours = _post(srv.url + "/api/chat", {"model": model.name, **body})
            assert real[0] == ours[0] == 200
            (real_reply,), (our_reply,) = real[2], ours[2]
            assert sorted(real_reply) == sorted(our_reply), (real_reply, our_reply)
            assert real_reply["_debug_info"] == our_reply["_debug_info"], messages


# ----------------------------------------------------------------- thinking


def _texts(lines: list[Any]) -> dict[str, bool]:
    """Which of text and thinking a reply carried (generate or chat)."""
    parts = [c.get("message") or c for c in lines]
    text = "".join(p.get("content") or p.get("response") or "" for p in parts)
    thought = "".join(p.get("thinking") or "" for p in parts)
    return {"text": bool(text.strip()), "thinking": bool(thought.strip())}


def _thinking_probes() -> Iterator[tuple[str, str, dict[str, Any]]]:
    opts = {"temperature": 0.0, "top_k": 0, "num_predict": 12, "seed": 3}
    hi = [{"role": "user", "content": "Hi"}]
    opened = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    model = "thinking-on-smollm2"
    yield (
        "think on a model without it",
        "/api/chat",
        {"model": "smollm2", "messages": hi, "think": True},
    )
    yield (
        "think false on a model without it",
        "/api/chat",
        {"model": "smollm2", "messages": hi, "think": False, "options": opts},
    )
    # Raw generate is parsed too (think defaults to true): a prompt that ends in
    # the opening tag starts inside the thinking.  magpie's raw requests send
    # think false, which gives the text back as written.
    for think in (None, False):
        body = {"model": model, "prompt": opened, "raw": True, "options": opts}
        if think is not None:
            body["think"] = think
        yield f"raw generate, think {think}", "/api/generate", body
    yield (
        "chat, thinking by default",
        "/api/chat",
        {"model": model, "messages": hi, "options": opts},
    )
    yield (
        "chat, think false",
        "/api/chat",
        {"model": model, "messages": hi, "think": False, "options": opts},
    )


def test_thinking_matches_the_real_server(thinking_models: RealOllama) -> None:
    """Ollama's thinking on the wire (``think``, ``thinking``, the 400 for a
    model without the capability), and the double (its parser ported from
    thinking/parser.go) serving the real server's /api/show of the same model."""
    from ollama_server import OllamaTestServer, ScriptedEngine, TestModel, smollm2_model

    url = thinking_models.url
    show = _post(url + "/api/show", {"model": "thinking-on-smollm2"})[2][0]
    assert "thinking" in show["capabilities"]
    engine = ScriptedEngine(text_fn=lambda source, options: "Paris is the capital of France.")
    models = [TestModel("thinking-on-smollm2", show, {}, engine), smollm2_model(engine)]
    diffs = []
    with OllamaTestServer(models) as srv:
        for name, path, body in _thinking_probes():
            real_status, _, real_lines = _post(url + path, {"stream": True, **body})
            dbody = {"stream": True, **body}
            if dbody["model"] == "smollm2":
                dbody["model"] = models[1].name
            our_status, _, our_lines = _post(srv.url + path, dbody)
            if real_status >= 400:
                real: Any = (real_status, real_lines[0]["error"])
                ours: Any = (our_status, our_lines[0]["error"].replace(models[1].name, "smollm2"))
            else:
                real, ours = (real_status, _texts(real_lines)), (our_status, _texts(our_lines))
            if real != ours:
                diffs.append(f"{name}: real {real} != double {ours}")
    assert not diffs, "\n".join(diffs)


# ----------------------------------------------------------------- the context

#: About 2,000 tokens of raw prompt (SmolLM2's tokenizer): four times a 512 context.
OVER_LONG = "The quick brown fox jumps over the lazy dog. " * 200
#: About 420 tokens: fits a 512 context, with room for about 90 more.
NEAR_THE_END = "The quick brown fox jumps over the lazy dog. " * 40 + (
    "Now count from 1 to 500 with commas: 1, 2, 3,"
)


def _context_probes(model: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Prompts longer than the context (and a generation that reaches its
    end) with and without magpie's truncate/shift false."""
    opts = {"temperature": 0.0, "top_k": 0, "num_predict": 8, "seed": 3}
    raw = {"model": model, "prompt": OVER_LONG, "raw": True, "stream": True, "options": opts}
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": OVER_LONG}],
        "stream": True,
        "options": opts,
    }
    no_cuts = {"truncate": False, "shift": False}
    yield "raw, truncate and shift false", "/api/generate", {**raw, **no_cuts}
    yield "chat, truncate and shift false", "/api/chat", {**chat, **no_cuts}
    yield "raw, not streamed", "/api/generate", {**raw, **no_cuts, "stream": False}
    yield "raw, shift false only", "/api/generate", {**raw, "truncate": True, "shift": False}
    yield "raw, Ollama's defaults: cut", "/api/generate", raw
    yield (
        "raw to the end of the context, shift false",
        "/api/generate",
        {
            **raw,
            **no_cuts,
            "prompt": NEAR_THE_END,
            "options": {**opts, "num_predict": 300, "stop": []},
        },
    )


def _context_shape(name: str, status: int, ctype: str, lines: list[Any]) -> dict[str, Any]:
    """What magpie reads of these replies: the status, the error nested as
    text (llama-server's body, its type and counts), or the counts of a reply."""
    out: dict[str, Any] = {"status": status, "content type": ctype}
    if status >= 400:
        error = lines[0]["error"]
        out["error is text"] = isinstance(error, str)
        try:
            inner = json.loads(error)["error"]
        except ValueError:
            out["error"] = error
            return out
        out["type"], out["n_ctx"] = inner["type"], inner["n_ctx"]
        prompt = inner["n_prompt_tokens"]
        # A chat's count depends on how its template is rendered (Go or Jinja).
        out["n_prompt_tokens"] = prompt if name.startswith("raw") else prompt > inner["n_ctx"]
        return out
    last = lines[-1]
    out["done_reason"] = last.get("done_reason")
    if "end" in name:
        out["prompt + eval"] = last["prompt_eval_count"] + last["eval_count"]
    else:
        out["prompt_eval_count"] = last["prompt_eval_count"]
    return out


def test_double_answers_a_prompt_longer_than_the_context_as_the_real_server(  # type: ignore[no-untyped-def]
    context_model: RealOllama,
):
    """Ollama 0.33 cuts a prompt that does not fit silently unless asked not to:
    ``truncate: false`` gives 400 with llama-server's exceed_context_size_error
    as a string (the counts in it), ``shift: false`` alone another 400, and
    with ``shift: false`` a generation stops at the end of the context
    ("length").  The double answers each the same."""
    from ollama_server import LlamaEngine, OllamaTestServer, smollm2_model

    from .conftest import CONTEXT, CONTEXT_MODEL

    model = smollm2_model(LlamaEngine(n_threads=1))
    model.show["parameters"] += f"\nnum_ctx                        {CONTEXT}"
    diffs, seen = [], {}
    with OllamaTestServer([model]) as srv:
        for name, path, body in _context_probes(CONTEXT_MODEL):
            real = _context_shape(name, *_post(context_model.url + path, body))
            ours = _context_shape(name, *_post(srv.url + path, {**body, "model": model.name}))
            seen[name] = real
            if real != ours:
                diffs.append(f"{name}: real {real} != double {ours}")
    assert not diffs, "\n".join(diffs)
    # What the parity holds the double to, on the real server.
    assert seen["raw, truncate and shift false"]["type"] == "exceed_context_size_error"
    assert seen["raw, Ollama's defaults: cut"]["prompt_eval_count"] < CONTEXT
    assert seen["raw to the end of the context, shift false"] == {
        "status": 200,
        "content type": "application/x-ndjson",
        "done_reason": "length",
        "prompt + eval": CONTEXT,
    }


def test_backend_reads_the_real_refusal(context_model: RealOllama) -> None:
    """magpie's requests on both paths: a ContextOverflow with the real server's
    counts, and an answer that reaches the end of the context is "length"."""
    from magpie.errors import ContextOverflow

    from .conftest import CONTEXT, CONTEXT_MODEL

    async def main(direct: bool) -> tuple[ContextOverflow, Any]:
        async with OllamaBackend(CONTEXT_MODEL, context_model.url, direct_stream=direct) as b:
            with pytest.raises(ContextOverflow) as info:
                await b.complete(OVER_LONG, sampling=GREEDY, stop=[])
            near = await b.complete(
                NEAR_THE_END, sampling=GREEDY.model_copy(update={"max_tokens": 300}), stop=[]
            )
            return info.value, near

    for direct in (True, False):
        err, near = _run(main(direct))
        assert err.context == CONTEXT and err.prompt_tokens is not None
        assert err.prompt_tokens > 1900 and not err.retryable
        assert near.finish_reason == "length"
        assert near.prompt_tokens + near.completion_tokens == CONTEXT


def test_a_render_is_never_cut(context_model: RealOllama) -> None:
    """With truncate on, Ollama drops the first messages of a conversation
    longer than the context from a render too: a pre-query or a conversation
    template learned from such a render would miss turns (``--turns`` with a
    long system prompt then failed to start).  magpie's renders send
    truncate false."""
    from .conftest import CONTEXT_MODEL

    messages = [
        {"role": "system", "content": OVER_LONG},
        {"role": "user", "content": "The first question?"},
        {"role": "assistant", "content": "The first answer."},
        {"role": "user", "content": "The second question?"},
    ]

    async def render() -> str | None:
        async with OllamaBackend(CONTEXT_MODEL, context_model.url) as b:
            return await b.render_chat(messages)

    rendered = _run(render())
    assert rendered is not None
    for m in messages:
        assert m["content"].strip() in rendered, m


# ----------------------------------------------------------------- dated templates


def test_double_renders_a_dated_template_as_the_real_server(dated_model: RealOllama) -> None:
    """``_debug_render_only`` of a template that writes ``{{ currentDate }}``
    (gpt-oss's does): the server's local date as 2006-01-02 (ollama/ollama
    template/template.go).  The double renders the same template
    (``render_dated``) on the same day to the same text for the requests magpie
    makes (the pre-query with and without a system prompt, conversations),
    and magpie finds the date in both."""
    from datetime import date, timedelta

    from ollama_server import RENDER_VERSION, OllamaTestServer, ScriptedEngine
    from ollama_server import dated_model as make_dated

    from .conftest import DATED_MODEL

    s = "MAGPIE_SENTINEL_7f3a9c"
    probes = [
        [{"role": "user", "content": s}],
        [{"role": "system", "content": "You are a chef."}, {"role": "user", "content": s}],
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": s},
        ],
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
            {"role": "user", "content": s},
        ],
    ]
    model = make_dated(ScriptedEngine(), name=f"{DATED_MODEL}:latest")
    diffs = []
    with OllamaTestServer([model], version=RENDER_VERSION) as srv:
        for messages in probes:
            body = {
                "model": DATED_MODEL,
                "messages": messages,
                "stream": False,
                "_debug_render_only": True,
                "options": {"num_predict": 1},
                "truncate": False,
                "shift": False,
            }
            days = {date.today()}
            status, _, lines = _post(dated_model.url + "/api/chat", body)
            days.add(date.today())  # a render at midnight may be either day
            assert status == 200, lines
            real = lines[0]
            ours_by_day = {}
            for day in days:
                srv.today = day
                ours_by_day[day] = _post(srv.url + "/api/chat", body)[2][0]
            text = real["_debug_info"]["rendered_template"]
            match = [
                d for d, o in ours_by_day.items() if o["_debug_info"]["rendered_template"] == text
            ]
            if not match:
                ours = next(iter(ours_by_day.values()))["_debug_info"]["rendered_template"]
                diffs.append(f"{messages}: real {text!r} != double {ours!r}")
                continue
            ours = ours_by_day[match[0]]
            if sorted(k for k in real if k != "created_at") != sorted(
                k for k in ours if k != "created_at"
            ):
                diffs.append(f"keys: real {sorted(real)} != double {sorted(ours)}")
            if (real.get("message"), real.get("done")) != (ours.get("message"), ours.get("done")):
                diffs.append(f"message/done: real {real} != double {ours}")
            assert f"Current date: {match[0]:%Y-%m-%d}<|im_end|>" in text
            assert match[0] in (date.today(), date.today() - timedelta(days=1))
    assert not diffs, "\n".join(diffs)

    # magpie's pre-query from each: the same text, today's date found in it.
    async def pre_query(url: str):  # type: ignore[no-untyped-def]
        async with OllamaBackend(DATED_MODEL, url) as b:
            return await render_pre_query(b, await b.describe())

    with OllamaTestServer([model], version=RENDER_VERSION) as srv:
        real_pq = _run(pre_query(dated_model.url))
        srv.today = date.fromisoformat(real_pq.dates[0])
        double_pq = _run(pre_query(srv.url))
    assert real_pq.source == double_pq.source == "ollama-render"
    assert real_pq.text == double_pq.text and real_pq.dates == double_pq.dates
    assert real_pq.after_user == double_pq.after_user
    assert real_pq.after_assistant == double_pq.after_assistant
    assert real_pq.undated == double_pq.undated and real_pq.dates[0] not in real_pq.undated
