"""An OpenAI-protocol test server, as vLLM and llama.cpp's ``llama-server`` speak it.

Built on :mod:`ollama_server`: the same engines (:class:`LlamaEngine` runs the
real SmolLM2 GGUF, :class:`ScriptedEngine` answers without a model), the same
fault classes, request recording, slot semaphore and lifecycle; only the HTTP
routes and the wire format differ.

* ``POST /v1/completions`` (raw ``prompt``, tokenized as sent, no template) and
  ``POST /v1/chat/completions`` (``messages`` through the model's chat
  template; ``response_format`` ``json_schema`` / ``json_object``).  With
  ``"stream": true`` the reply is Server-Sent Events: ``data: {chunk}`` lines,
  a usage chunk (``choices: []``) when ``stream_options.include_usage``, then
  ``data: [DONE]``; otherwise one JSON object with ``usage``.  ``n`` > 1 gives
  that many choices, each with its ``index`` (streamed round-robin, as vLLM
  interleaves them); choice ``i`` is sampled with ``seed + i``, as vLLM's
  parallel sampling seeds its child requests, so the same request and seed
  give the same ``n`` choices.  ``max_n`` caps the choices (a server that
  ignores ``n`` is ``max_n=1``); ``samples`` counts the choices generated per
  path, ``served`` the requests.
* ``GET /v1/models``, ``GET /health``, ``POST /tokenize``; ``GET /props``
  (llama.cpp: the GGUF chat template, BOS/EOS strings) unless ``props=False``.
* ``POST /v1/embeddings`` (``{"model", "input": str | [str]}`` ->
  ``data[i] = {"object": "embedding", "index", "embedding"}``, ``usage``) for
  any served model: a TEST STAND-IN for an embedding model, the bag of words
  of :func:`ollama_server.word_embedding` (the same words in another order:
  cosine 1.0).  ``data`` comes in reverse order, as the protocol orders it by
  ``index``, not by position.
* Errors are ``{"error": {"message", "type", "code"}}`` (``legacy_errors``:
  older vLLM's top-level ``{"object": "error", "message", ...}``).
* ``context`` (llama-server's ``-c`` per slot, vLLM's ``--max-model-len``) for
  engines that count a prompt's tokens (``prompt_tokens``): llama-server
  refuses a prompt that leaves no room for a token with 400
  ``exceed_context_size_error`` (``n_prompt_tokens``, ``n_ctx``) and stops a
  generation at the end of the context (no context shift: finish reason
  "length"); vLLM refuses a prompt whose ``max_tokens`` do not fit beside it
  with 400 and :func:`vllm_context_message` (a prompt longer than the context
  without ``max_tokens``: its engine's text).  Neither cuts a prompt.

Two flavors set the differences that matter to a client:

``"vllm"``: no ``/props``; ``/tokenize`` takes ``prompt``/``add_special_tokens``;
an unknown ``model`` is a 404; sampling defaults are vLLM's (temperature 1,
top-k off, ``max_tokens`` 16 for completions); ``top_k`` 0 is rejected as older
vLLM does (-1 means off); a mid-stream failure is a ``data: {"error": ...}``
event followed by ``data: [DONE]``; a wrong API key gets ``{"error": "Unauthorized"}``.

``latency`` is slept once per generation request, whatever its ``n`` (vLLM
decodes the ``n`` samples together; the engine's own latency, if any, is per
sample).

``"llamacpp"``: ``/props`` on; ``/tokenize`` takes ``content``/``add_special``;
the request's ``model`` is ignored (one model per server); defaults are
llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, no token limit); a
mid-stream failure is an ``error: {...}`` line.

Fault injection (:meth:`OpenAITestServer.inject`): :class:`HttpError`,
:class:`Delay`, :class:`DropConnection`, :class:`EmptyResponse`,
:class:`MidStreamError` from :mod:`ollama_server`, plus :class:`CutStream`
(the stream ends after one chunk, with no finish reason and no ``[DONE]``).

Command line (prints the URL, serves until SIGTERM/SIGINT)::

    python tests/support/openai_server.py --port 0 --flavor vllm --engine scripted
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from ollama_server import (
    BUSY,
    EMBED_DIM,
    Delay,
    DropConnection,
    EmptyResponse,
    Engine,
    Generation,
    HttpError,
    LlamaEngine,
    MidStreamError,
    OllamaTestServer,
    ScriptedEngine,
    ThinkingParser,
    _ClientGone,
    _Handler,
    _HTTPServer,
    _Injection,
    serve_until_signal,
    smollm2_gguf_path,
    word_embedding,
)

__all__ = [
    "CutStream",
    "Delay",
    "DropConnection",
    "EmptyResponse",
    "HttpError",
    "LlamaEngine",
    "MidStreamError",
    "OpenAITestServer",
    "PacedEngine",
    "ScriptedEngine",
    "ServedModel",
    "smollm2_served",
]

Flavor = Literal["vllm", "llamacpp"]
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
SMOLLM2_ID = "SmolLM2-135M-Instruct"

#: Each server's sampling defaults when a request leaves a field out.
DEFAULTS: dict[str, dict[str, Any]] = {
    "vllm": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0},
    "llamacpp": {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0},
}


def llamacpp_context_error(prompt_tokens: int, n_ctx: int) -> dict[str, Any]:
    """llama-server's 400 body for a prompt that leaves no room in the context."""
    return {
        "error": {
            "code": 400,
            "message": f"request ({prompt_tokens} tokens) exceeds the available context size "
            f"({n_ctx} tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt_tokens,
            "n_ctx": n_ctx,
        }
    }


def vllm_context_message(prompt_tokens: int, max_tokens: int | None, context: int) -> str:
    """vLLM's 400 text (``vllm/renderers/params.py``, the engine's
    ``_validate_prompt_len`` without ``max_tokens``)."""
    if max_tokens is None:
        return (
            f"The decoder prompt (length {prompt_tokens}) is longer than the maximum model "
            f"length of {context}. Make sure that `max_model_len` is no smaller than the "
            "number of text tokens."
        )
    return (
        f"You passed {prompt_tokens} input tokens and requested {max_tokens} output tokens. "
        f"However, the model's context length is only {context} tokens, resulting in a "
        f"maximum input length of {context - max_tokens} tokens. Please reduce the length "
        "of the input prompt."
    )


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}


@dataclasses.dataclass(frozen=True)
class CutStream:
    """Streaming: one chunk, then the body ends (no finish reason, no ``[DONE]``)."""


Fault = HttpError | Delay | EmptyResponse | MidStreamError | DropConnection | CutStream


@dataclasses.dataclass
class ServedModel:
    """A model the server serves: its id, engine and what ``/props`` tells of it.

    ``adds_bos`` drives ``/tokenize`` for engines without a vocabulary (a
    :class:`LlamaEngine` model tokenizes with its GGUF's own).
    """

    __test__ = False

    id: str
    engine: Engine
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    adds_bos: bool = True


@functools.lru_cache(maxsize=4)
def _vocab(path: str) -> tuple[Any, threading.Lock]:
    """A vocabulary-only llama (cheap: no weights) for metadata and tokenizing."""
    import llama_cpp

    from magpie.backends.llamacpp.buildcheck import check_build

    check_build(path)  # as every llama.cpp load does
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False), threading.Lock()


def smollm2_served(engine: Engine | None = None, model_id: str = SMOLLM2_ID) -> ServedModel:
    """SmolLM2-135M-Instruct (real by default) with its GGUF's chat template and tokens."""
    llm, _ = _vocab(str(smollm2_gguf_path()))
    vocab = llm._model
    return ServedModel(
        id=model_id,
        engine=engine if engine is not None else LlamaEngine(),
        chat_template=llm.metadata["tokenizer.chat_template"],
        bos_token=vocab.token_get_text(llm.token_bos()),
        eos_token=vocab.token_get_text(llm.token_eos()),
        adds_bos=False,
    )


def tokenize(model: ServedModel, text: str, add_special: bool) -> list[int]:
    """Token ids of ``text`` as the server would count them."""
    if isinstance(model.engine, LlamaEngine):
        path = model.engine.gguf_path or smollm2_gguf_path()
        llm, lock = _vocab(str(path))
        with lock:
            return list(llm.tokenize(text.encode(), add_bos=add_special, special=True))
    ids = [int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) for w in text.split()]
    return [1, *ids] if add_special and model.adds_bos else ids


class PacedEngine:
    """Fixed pieces, ``interval`` seconds apart: for timeouts and aborts.

    ``emitted`` counts the pieces handed out; ``closed`` is set when the run was
    stopped early (the client went away).
    """

    def __init__(self, pieces: list[str], interval: float) -> None:
        self.pieces = pieces
        self.interval = interval
        self.emitted = 0
        self.closed = threading.Event()

    def _run(self, gen: Generation) -> Iterator[str]:
        try:
            for piece in self.pieces:
                time.sleep(self.interval)
                self.emitted += 1
                gen.eval_count += 1
                yield piece
        except GeneratorExit:
            self.closed.set()
            raise

    def generate(self, prompt: str, options: Mapping[str, Any], fmt: Any = None) -> Generation:
        gen = Generation()
        gen.prompt_eval_count = len(prompt.split())
        gen.pieces = self._run(gen)
        return gen

    def chat(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], fmt: Any = None
    ) -> Generation:
        return self.generate(" ".join(m.get("content") or "" for m in messages), options, fmt)


class _BadRequest(Exception):
    pass


class OpenAITestServer(OllamaTestServer):
    """An OpenAI-protocol HTTP server for tests (context manager).

    ``usage=False`` never sends usage (as servers that ignore
    ``stream_options``); ``ignore_stream`` answers one JSON object even to
    streaming requests; ``api_key`` makes every request need
    ``Authorization: Bearer <api_key>``; ``latency`` seconds are slept once per
    generation request; ``max_n`` caps the choices of a request.
    """

    def __init__(
        self,
        models: Iterable[ServedModel],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        flavor: Flavor = "vllm",
        props: bool | None = None,
        legacy_errors: bool = False,
        api_key: str | None = None,
        usage: bool = True,
        ignore_stream: bool = False,
        slots: int | None = None,
        max_queue: int | None = None,
        latency: float = 0.0,
        max_n: int | None = None,
        embeddings: bool = True,
        apply_template: bool | None = None,
        reasoning_format: str | None = None,
        context: int = 8192,
    ) -> None:
        """``embeddings``: serve /v1/embeddings (llama-server needs
        ``--embeddings`` for it and answers 501 without); ``apply_template``:
        llama.cpp's ``POST /apply-template`` (default: on for "llamacpp");
        ``reasoning_format`` "deepseek": a streamed chat answer's leading
        ``<think>...</think>`` goes out as ``delta.reasoning_content`` (llama-server
        ``--reasoning-format deepseek``, vLLM ``--reasoning-parser``); ``context``:
        the tokens of a prompt and its answer (see the module docstring)."""
        super().__init__([], host, port, slots=slots, max_queue=max_queue)
        self.embeddings = embeddings
        self.apply_template = flavor == "llamacpp" if apply_template is None else apply_template
        self.latency = latency
        self.max_n = max_n
        self._samples: collections.Counter[str] = collections.Counter()
        self.models = list(models)  # type: ignore[arg-type]
        self.flavor = flavor
        self.props = flavor == "llamacpp" if props is None else props
        self.legacy_errors = legacy_errors
        self.api_key = api_key
        self.usage = usage
        self.ignore_stream = ignore_stream
        self.reasoning_format = reasoning_format
        self.context = context

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    @property
    def samples(self) -> collections.Counter[str]:
        """Choices generated per generation path (the sum of the requests' ``n``)."""
        with self._lock:
            return collections.Counter(self._samples)

    def clear_requests(self) -> None:
        super().clear_requests()
        with self._lock:
            self._samples.clear()

    def _count_samples(self, path: str, n: int) -> None:
        with self._lock:
            self._samples[path] += n

    def find_model(self, name: str) -> ServedModel | None:  # type: ignore[override]
        """The served model ``name`` (llama.cpp: the one model, whatever the name)."""
        served: list[ServedModel] = self.models  # type: ignore[assignment]
        if self.flavor == "llamacpp" or not name:
            return served[0] if served else None
        return next((m for m in served if m.id == name), None)

    def inject(  # type: ignore[override]
        self,
        fault: Fault,
        times: int | None = 1,
        path: str | None = None,
        share: float | None = None,
    ) -> None:
        """Queue ``fault`` for the next ``times`` matching requests (None: all).

        ``path`` None matches any path, except that EmptyResponse,
        MidStreamError and CutStream only match the two generation paths.
        ``share``: only that share of the matching requests, spread evenly.
        """
        with self._lock:
            self._faults.append(_Injection(fault, times, path, share))  # type: ignore[arg-type]

    def _take_fault(self, path: str) -> Fault | None:  # type: ignore[override]
        with self._lock:
            for injection in self._faults:
                generation_only = isinstance(
                    injection.fault, EmptyResponse | MidStreamError | CutStream
                )
                if injection.path is not None:
                    matches = injection.path == path
                else:
                    matches = path in GENERATION_PATHS or not generation_only
                if matches and injection.hits():
                    if injection.remaining is not None:
                        injection.remaining -= 1
                        if injection.remaining <= 0:
                            self._faults.remove(injection)
                    return injection.fault  # type: ignore[return-value]
        return None


class _OpenAIHTTPServer(_HTTPServer):
    #: listen() backlog: many clients connect at once (the stdlib default is 5).
    request_queue_size = 256

    def finish_request(self, request: Any, client_address: Any) -> None:
        _OpenAIHandler(request, client_address, self)


def _now() -> int:
    return int(time.time())


class _OpenAIHandler(_Handler):
    server_version = "openai-test"

    @property
    def owner(self) -> OpenAITestServer:  # type: ignore[override]
        return self.server.owner  # type: ignore[return-value]

    # -- wire format

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(status, "server_error")
        if self.owner.legacy_errors:
            return {
                "object": "error",
                "message": message,
                "type": kind,
                "param": None,
                "code": status,
            }
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, self._error_body(status, message))

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, line: str) -> None:
        data = (line + "\n\n").encode()
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone from exc

    def _data(self, payload: Any) -> None:
        self._event("data: " + json.dumps(payload))

    # -- routing

    def _authorized(self) -> bool:
        key = self.owner.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        if self.owner.flavor == "vllm":
            self._send_json(401, {"error": "Unauthorized"})
        else:
            self._error(401, "Invalid API Key")
        return False

    def _route(self, body: Any, bad_json: str | None, fault: Any) -> None:
        path, method = self.path, self.command
        if path == "/health" and method == "GET":
            self._send_json(200, {"status": "ok"})
            return
        if not self._authorized():
            return
        if path == "/v1/models" and method == "GET":
            self._models()
        elif path == "/props" and method == "GET" and self.owner.props:
            self._props()
        elif path == "/apply-template" and method == "POST" and self.owner.apply_template:
            self._apply_template(body)
        elif method == "POST" and path in ("/tokenize", "/v1/embeddings", *GENERATION_PATHS):
            if bad_json is not None or not isinstance(body, dict):
                self._error(400, bad_json or "the request body must be a JSON object")
            elif path == "/tokenize":
                self._tokenize(body)
            elif path == "/v1/embeddings":
                self._embeddings(body)
            else:
                try:
                    self._generation(body, fault, chat=path == "/v1/chat/completions")
                except _BadRequest as exc:
                    self._error(400, str(exc))
        elif self.owner.flavor == "vllm":
            self._send_json(404, {"detail": "Not Found"})
        else:
            self._error(404, "File Not Found")

    def _models(self) -> None:
        owned_by = "vllm" if self.owner.flavor == "vllm" else "llamacpp"
        data = [
            {"id": m.id, "object": "model", "created": _now(), "owned_by": owned_by}
            for m in self.owner.models  # type: ignore[attr-defined]
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _props(self) -> None:
        model = self.owner.find_model("")
        assert model is not None
        self._send_json(
            200,
            {
                "default_generation_settings": {
                    "n_ctx": self.owner.context,
                    "params": DEFAULTS["llamacpp"],
                },
                "total_slots": self.owner.slots or 1,
                "model_path": f"/models/{model.id}.gguf",
                "chat_template": model.chat_template or "",
                "bos_token": model.bos_token,
                "eos_token": model.eos_token,
                "build_info": "b0000-openai-test",
            },
        )

    def _apply_template(self, body: Any) -> None:
        """llama.cpp's /apply-template: the chat template rendered with the
        generation prompt, BOS included as the template writes it."""
        from magpie.templates.jinja import render_chat_template

        model = self.owner.find_model("")
        assert model is not None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            self._error(400, "'messages' is required")
            return
        prompt = render_chat_template(
            model.chat_template or "",
            messages,
            bos_token=model.bos_token,
            eos_token=model.eos_token,
        )
        self._send_json(200, {"prompt": prompt})

    def _tokenize(self, body: dict[str, Any]) -> None:
        model = self.owner.find_model(str(body.get("model") or ""))
        if model is None:
            self._error(404, f"The model `{body.get('model')}` does not exist.")
            return
        if self.owner.flavor == "llamacpp":
            tokens = tokenize(model, str(body.get("content", "")), bool(body.get("add_special")))
            self._send_json(200, {"tokens": tokens})
        else:
            text = str(body.get("prompt", ""))
            tokens = tokenize(model, text, body.get("add_special_tokens", True) is not False)
            self._send_json(
                200,
                {"tokens": tokens, "count": len(tokens), "max_model_len": self.owner.context},
            )

    def _embeddings(self, body: dict[str, Any]) -> None:
        if not self.owner.embeddings:
            # llama-server started without --embeddings.
            self._error(
                501, "This server does not support embeddings. Start it with `--embeddings`"
            )
            return
        name = str(body.get("model") or "")
        model = self.owner.find_model(name)
        if model is None:
            self._error(404, f"The model `{name}` does not exist.")
            return
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(t, str) for t in inputs)
        ):
            self._error(400, "input must be a string or a non-empty list of strings")
            return
        dim = int(body.get("dimensions") or EMBED_DIM)
        data = [
            {"object": "embedding", "index": i, "embedding": word_embedding(text, dim)}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(len(text.split()) for text in inputs)
        self._send_json(
            200,
            {
                "id": f"embd-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}",
                "object": "list",
                "created": _now(),
                "model": model.id,
                "data": data[::-1],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # -- generation

    def _options(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The request's sampling as engine options (Ollama-style keys)."""
        flavor = self.owner.flavor
        opts = dict(DEFAULTS[flavor])
        for key in ("temperature", "top_p", "seed"):
            if body.get(key) is not None:
                opts[key] = body[key]
        penalty = body.get("repeat_penalty", body.get("repetition_penalty"))
        if penalty is not None:
            opts["repeat_penalty"] = float(penalty)
        top_k = body.get("top_k")
        if top_k is not None:
            top_k = int(top_k)
            if top_k < -1 or (top_k == 0 and flavor == "vllm"):
                raise _BadRequest(f"top_k must be -1 (disable), or at least 1, got {top_k}.")
            opts["top_k"] = max(top_k, 0)  # the engine reads 0 as "off"
        if float(opts["temperature"]) < 0:
            raise _BadRequest("temperature must be non-negative")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None and flavor == "vllm" and not chat:
            max_tokens = 16
        if max_tokens is not None:
            if int(max_tokens) < 1:
                raise _BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
            opts["num_predict"] = int(max_tokens)
        stop = body.get("stop")
        if stop:
            opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return opts

    def _fit_context(
        self, model: ServedModel, source: str | list[dict[str, Any]], opts: dict[str, Any]
    ) -> bool:
        """Whether the prompt fits the context (else the server's 400 was sent);
        llama-server's generation is capped at the end of the context."""
        count = getattr(model.engine, "prompt_tokens", None)
        if count is None:
            return True
        n, context = int(count(source)), self.owner.context
        budget = opts.get("num_predict")
        if self.owner.flavor == "llamacpp":
            if n >= context:
                self._send_json(400, llamacpp_context_error(n, context))
                return False
            room = context - n
            opts["num_predict"] = room if budget is None else min(int(budget), room)
            return True
        if n + (1 if budget is None else int(budget)) > context:
            self._error(400, vllm_context_message(n, budget, context))
            return False
        return True

    @staticmethod
    def _format(body: dict[str, Any]) -> Any:
        spec = body.get("response_format") or {}
        if spec.get("type") == "json_schema":
            schema = (spec.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise _BadRequest("response_format.json_schema.schema must be an object")
            return schema
        if spec.get("type") == "json_object":
            return "json"
        return None

    def _generation(self, body: dict[str, Any], fault: Any, *, chat: bool) -> None:
        name = str(body.get("model") or "")
        model = self.owner.find_model(name)
        if model is None:
            self._error(404, f"The model `{name}` does not exist.")
            return
        opts, fmt = self._options(body, chat), self._format(body)
        n = int(body.get("n") or 1)
        if n < 1:
            raise _BadRequest("n must be at least 1")
        if self.owner.max_n is not None:
            n = min(n, self.owner.max_n)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("messages must be a non-empty list")
            engine_call: Callable[..., Generation] = functools.partial(model.engine.chat, messages)
            source: str | list[dict[str, Any]] = messages
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _BadRequest("prompt must be a string")
            engine_call = functools.partial(model.engine.generate, prompt)
            source = prompt
        if not self._fit_context(model, source, opts):
            return

        def start(i: int) -> Generation:
            if isinstance(fault, EmptyResponse):
                return Generation()
            seed = opts.get("seed")
            return engine_call({**opts, "seed": None if seed is None else int(seed) + i}, fmt)

        stream = bool(body.get("stream")) and not self.owner.ignore_stream
        if isinstance(fault, MidStreamError | CutStream) and not stream:
            self._error(500, getattr(fault, "message", "the stream was cut"))
            return
        if not self.owner._acquire_slot():
            self._error(503, BUSY)
            return
        try:
            if self.owner.latency and self.owner._sleep(self.owner.latency):
                return  # the server is stopping
            self.owner._count_samples(self.path, n)
            reply = _Reply(self, model.id, chat=chat)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if stream:
                reply.stream(start, n, fault, include_usage and self.owner.usage)
            else:
                reply.whole(start, n)
        finally:
            self.owner._release_slot()


class _Reply:
    """Writes the generations of one request as SSE chunks or as one JSON object."""

    def __init__(self, handler: _OpenAIHandler, model_id: str, *, chat: bool) -> None:
        self.handler = handler
        self.model_id = model_id
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}"
        self.created = _now()
        self.gens: list[Generation] = []

    def _choice(self, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    def _usage(self) -> dict[str, int]:
        prompt = self.gens[0].prompt_eval_count if self.gens else 0
        completion = sum(g.eval_count for g in self.gens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _run(self, start: Callable[[int], Generation], i: int) -> tuple[list[str], str]:
        gen = start(i)
        self.gens.append(gen)
        try:
            pieces = list(gen)
        finally:
            gen.close()
        return pieces, gen.done_reason

    def whole(self, start: Callable[[int], Generation], n: int) -> None:
        """One JSON object with every choice, or 500 if the engine fails."""
        h = self.handler
        try:
            runs = [self._run(start, i) for i in range(n)]
        except Exception as exc:
            h._error(500, str(exc))
            return
        choices = []
        for i, (pieces, reason) in enumerate(runs):
            text = "".join(pieces)
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": i, "text": text, "logprobs": None}
            choices.append({**choice, "finish_reason": reason})
        kind = "chat.completion" if self.chat else "text_completion"
        payload = {**self._chunk(choices), "object": kind, "usage": self._usage()}
        h._send_json(200, payload)

    def stream(
        self, start: Callable[[int], Generation], n: int, fault: Any, include_usage: bool
    ) -> None:
        """SSE: role chunk (chat), pieces, finish chunks, usage, ``[DONE]``.

        One choice streams live; several are generated one after the other
        (a llama model runs one sequence at a time) and sent interleaved.
        """
        h = self.handler
        # llama-server puts a completion's usage into its last choice chunk; a
        # chat's (and vLLM's) comes in a chunk of its own with no choices.
        self.usage_in_final = (
            include_usage and not self.chat and h.owner.flavor == "llamacpp"  # type: ignore[attr-defined]
        )
        h._start_stream()
        try:
            if self.chat:
                role = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(n)
                ]
                h._data(self._chunk([{**c, "logprobs": None, "finish_reason": None} for c in role]))
            ok = self._stream_one(start, fault) if n == 1 else self._stream_many(start, n)
            if not ok:
                h._end_stream()
                return
            if include_usage and not self.usage_in_final:
                h._data({**self._chunk([]), "usage": self._usage()})
            h._event("data: [DONE]")
        except _ClientGone:
            raise
        except Exception as exc:  # the engine failed mid-stream
            self._fail(str(exc))
        h._end_stream()

    def _stream_one(self, start: Callable[[int], Generation], fault: Any) -> bool:
        """Stream choice 0 as it is generated; False when a fault cut it."""
        h = self.handler
        gen = start(0)
        self.gens.append(gen)
        parser = (
            ThinkingParser()
            if self.chat and getattr(h.owner, "reasoning_format", None) == "deepseek"
            else None
        )
        try:
            for count, piece in enumerate(gen, 1):
                if parser is not None:
                    thought, text = parser.add(piece)
                    delta: dict[str, Any] = {}
                    if thought:
                        delta["reasoning_content"] = thought
                    if text:
                        delta["content"] = text
                    if delta:
                        choice = {"index": 0, "delta": delta, "logprobs": None}
                        h._data(self._chunk([{**choice, "finish_reason": None}]))
                else:
                    h._data(self._chunk([self._choice(0, piece, None)]))
                if count == 1 and isinstance(fault, MidStreamError):
                    self._fail(fault.message)
                    return False
                if count == 1 and isinstance(fault, CutStream):
                    return False
        finally:
            gen.close()
        self._final_chunk([self._choice(0, None if self.chat else "", gen.done_reason)])
        return True

    def _stream_many(self, start: Callable[[int], Generation], n: int) -> bool:
        runs = [self._run(start, i) for i in range(n)]
        longest = max(len(pieces) for pieces, _ in runs)
        for step in range(longest):
            for i, (pieces, _) in enumerate(runs):
                if step < len(pieces):
                    self.handler._data(self._chunk([self._choice(i, pieces[step], None)]))
        finals = [self._choice(i, None if self.chat else "", r) for i, (_, r) in enumerate(runs)]
        self._final_chunk(finals)
        return True

    def _final_chunk(self, choices: list[dict[str, Any]]) -> None:
        chunk = self._chunk(choices)
        if getattr(self, "usage_in_final", False):
            chunk["usage"] = self._usage()
        self.handler._data(chunk)

    def _fail(self, message: str) -> None:
        """A mid-stream error event, in the server's own way."""
        h = self.handler
        if h.owner.flavor == "llamacpp":
            h._event(
                "error: " + json.dumps({"code": 500, "message": message, "type": "server_error"})
            )
        else:
            h._data(h._error_body(500, message))
            h._event("data: [DONE]")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print the URL as the first and only stdout line."""
    parser = argparse.ArgumentParser(description="OpenAI-protocol test server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--flavor", choices=("vllm", "llamacpp"), default="vllm")
    parser.add_argument("--engine", choices=("llama", "scripted"), default="llama")
    parser.add_argument("--gguf", default=None, help="GGUF for --engine llama (default SmolLM2)")
    parser.add_argument("--latency", type=float, default=0.0, help="scripted: seconds per sample")
    parser.add_argument(
        "--request-latency", type=float, default=0.0, help="seconds per request, whatever its n"
    )
    parser.add_argument("--slots", type=int, default=None, help="parallel generations")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    engine: Engine
    if args.engine == "llama":
        engine = LlamaEngine(args.gguf)
        model = (
            smollm2_served(engine)
            if args.gguf is None
            else ServedModel(Path(args.gguf).stem, engine)
        )
    else:
        model = smollm2_served(ScriptedEngine(latency=args.latency))
    server = OpenAITestServer(
        [model],
        args.host,
        args.port,
        flavor=args.flavor,
        api_key=args.api_key,
        slots=args.slots,
        latency=args.request_latency,
    )
    return serve_until_signal(server)


if __name__ == "__main__":
    sys.exit(main())


OpenAITestServer._server_class = _OpenAIHTTPServer
OpenAITestServer._thread_prefix = "openai-test"
