"""The OpenAI-compatible backend: :class:`OpenAIBackend` (see :mod:`magpie.backends.openai`)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import httpx

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.backends.http import (
    context_overflow,
    error_message,
    retryable_status,
    transport_failure,
)
from magpie.backends.openai.hosts import normalize_host
from magpie.backends.openai.wire import Reply, events, sampling_fields
from magpie.errors import (
    BackendError,
    BackendUnavailable,
    ContextOverflow,
    MagpieError,
    ModelNotFound,
)

#: Seconds without a byte from the server before a request fails (and is retried).
DEFAULT_TIMEOUT = 300.0
#: The ``json_schema.name`` sent with structured-output requests.
SCHEMA_NAME = "verdict"

#: Statuses worth a retry besides 5xx: request timeout, rate limit.
_RETRYABLE_STATUS = frozenset({408, 429})


class OpenAIBackend(Backend):
    """Talks to an OpenAI-compatible server over HTTP (``httpx.AsyncClient``).

    ``model`` None means the server's only (or first) model, looked up once in
    ``GET /v1/models``.  ``api_key`` defaults to ``OPENAI_API_KEY``; the
    ``Authorization`` header is sent only when a key is set.  Retries are not
    done here (:mod:`magpie.backends.retry`).
    """

    name = "openai"
    #: vLLM and SGLang batch what they get; llama-server queues it.
    auto_concurrency = 16

    def __init__(
        self,
        model: str | None,
        host: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        api_key: str | None = None,
    ) -> None:
        self._model = model or None
        self._host = normalize_host(host)
        self._timeout = timeout
        self._api_key = api_key if api_key is not None else os.getenv("OPENAI_API_KEY") or None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._host,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            # Concurrency is bounded by the pipeline, not by the connection pool.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    @property
    def model(self) -> str:
        """The model id (empty until resolved when none was given)."""
        return self._model or ""

    @property
    def host(self) -> str:
        return self._host

    # -- error mapping ------------------------------------------------------
    def _status_error(self, status: int, body: bytes, path: str) -> Exception:
        msg = error_message(body)
        where = f"the OpenAI-compatible server at {self._host}"
        found = context_overflow(status, body)
        if found is not None:
            # llama-server's exceed_context_size_error, vLLM's and SGLang's 400s:
            # the server refuses what does not fit (vLLM counts the answer asked
            # for too), it never cuts it.
            return ContextOverflow(
                f"the prompt does not fit the context of {where} ({found.counts()}: {found.said})",
                prompt_tokens=found.prompt_tokens,
                context=found.context,
                fix="the server fixes its context when it starts: restart it with a longer "
                "one (llama-server -c N, shared by its --parallel slots; vllm serve "
                "--max-model-len N), or ask for less (--turns, --response-max-tokens)",
            )
        if status == 404:
            lowered = msg.lower()
            if "model" in lowered or (self._model and self._model.lower() in lowered):
                return ModelNotFound(
                    f"model {self._model!r} is not served by {where} ({msg}); "
                    f"list its models with `curl {self._host}/v1/models` and pass one as --model"
                )
            return BackendError(
                f"{where} has no {path} (404: {msg}); is --host the server's base URL?",
                retryable=False,
                cause="http_404",
            )
        if status == 401:
            hint = (
                "the API key was refused: check OPENAI_API_KEY"
                if self._api_key
                else "it needs an API key: set OPENAI_API_KEY"
            )
            return BackendError(
                f"{where} answered 401 ({msg}): {hint}", retryable=False, cause="http_401"
            )
        retryable = retryable_status(status, _RETRYABLE_STATUS)
        return BackendError(
            f"{where} answered {status}: {msg}", retryable=retryable, cause=f"http_{status}"
        )

    def _translate(self, exc: BaseException) -> Exception:
        failure = transport_failure(exc)
        if failure == "unreachable":
            return BackendUnavailable(
                f"OpenAI-compatible server is not reachable at {self._host}",
                fix="start it (e.g. `vllm serve MODEL`, `llama-server -m MODEL.gguf`) "
                "or pass --host",
            )
        if failure == "timeout":
            return BackendError(
                f"the server at {self._host} sent nothing for {self._timeout:g} s",
                cause="timeout",
            )
        if failure == "connection":
            return BackendError(
                f"connection to the server at {self._host} failed: {exc.__class__.__name__}",
                cause="connection",
            )
        return exc  # type: ignore[return-value]

    # -- plumbing -----------------------------------------------------------
    async def _get_json(self, path: str) -> Any:
        """``GET path``'s JSON, retried as a start-up request."""

        async def once() -> Any:
            resp = await self._request("GET", path)
            if resp.status_code >= 400:
                raise self._status_error(resp.status_code, resp.content, path)
            try:
                return resp.json()
            except ValueError:
                raise BackendError(
                    f"{self._host}{path} did not answer JSON: is --host an OpenAI-compatible "
                    "server?",
                    retryable=False,
                    cause="bad_reply",
                ) from None

        return await self._start_request(once)

    async def _optional(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON of an endpoint that not every server has (llama.cpp's
        ``/props``, ``/tokenize``, ``/apply-template``), retried as a start-up
        request: None where the server has no such endpoint (vLLM's 404, a
        501) or answers no JSON.  A busy or failing server (5xx, 408, 429:
        llama-server answers 503 "Loading model" while it loads) or a failed
        connection raises, to be asked again: its answer is not "no such
        endpoint" (a busy ``/tokenize`` had made the pre-query lose its first
        token, a busy ``/apply-template`` the server's own rendering)."""

        async def once() -> Any:
            resp = await self._request(method, path, body)
            status = resp.status_code
            if status != 501 and retryable_status(status, _RETRYABLE_STATUS):
                raise self._status_error(status, resp.content, path)
            if status != 200:
                return None
            try:
                return resp.json()
            except ValueError:
                return None

        return await self._start_request(once)

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One plain (not streamed) request, its transport errors translated."""
        try:
            return await self._client.request(method, path, json=body)
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _post(
        self, path: str, body: dict[str, Any], abort: AbortCheck | None = None
    ) -> Reply:
        """POST a generation request and gather its (streamed) reply.

        When ``abort`` says so, the stream is closed (the server then cancels
        the generation) and the reply is marked aborted.
        """
        await self._ensure_model()
        body = {"model": self._model, **body}
        reply = Reply()
        try:
            async with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    raise self._status_error(resp.status_code, await resp.aread(), path)
                if "text/event-stream" not in resp.headers.get("content-type", ""):
                    # A server (or proxy) that ignored "stream": one JSON reply.
                    reply.add(json.loads(await resp.aread()))
                else:
                    async for event in events(resp.aiter_lines(), self._host):
                        grown = reply.add(event)
                        if abort is not None and grown is not None and grown.finish is None:
                            reply.aborted = abort(grown.text)
                            if reply.aborted:
                                return reply  # leaving the block closes the stream
        except MagpieError:
            raise
        except ValueError as exc:  # a non-streamed reply that is not JSON
            raise BackendError(
                f"the server at {self._host} sent a malformed reply: {exc}", cause="bad_reply"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if not reply.choices or any(c.finish is None for c in reply.choices.values()):
            raise BackendError(
                f"the server at {self._host} closed the stream before it was done",
                cause="connection",
            )
        return reply

    async def probe(self) -> str:
        served = await self.list_models()
        return f"OpenAI-compatible server at {self._host} (serves {', '.join(served) or 'nothing'})"

    async def list_models(self) -> list[str]:
        """The model ids the server lists in ``GET /v1/models``."""
        data = await self._get_json("/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in items or [] if isinstance(m, dict) and "id" in m]

    def _pick_model(self, served: list[str]) -> str:
        """The model to use among the served ones (the first when none was named)."""
        if self._model is None and served:
            return served[0]
        if self._model is None or self._model not in served:
            what = f"model {self._model!r} is not" if self._model else "no model is"
            raise ModelNotFound(
                f"{what} served by the OpenAI-compatible server at {self._host}; it serves: "
                f"{', '.join(served) or 'nothing'} (`curl {self._host}/v1/models`)"
            )
        return self._model

    async def _ensure_model(self) -> None:
        if self._model is None:
            self._model = self._pick_model(await self.list_models())

    # -- the contract -------------------------------------------------------
    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        body = {
            "prompt": prompt,
            **sampling_fields(sampling, seed, stop),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return (await self._post("/v1/completions", body, abort)).completion()

    def supports_complete_n(self) -> bool:
        return True

    async def complete_n(
        self,
        prompt: str,
        n: int,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
    ) -> list[Completion]:
        """``n`` raw completions of one prompt from one request (``n`` parameter).

        vLLM prefills the prompt once for all samples.  The result is in choice
        order; a server that ignores ``n`` (older llama.cpp) returns fewer, never
        more.  With a seed the samples still differ (vLLM seeds choice ``i``
        with ``seed + i``).  Each completion's ``prompt_tokens`` is the prompt's
        length (the server prefilled it once); ``completion_tokens`` is that
        choice's streamed chunk count, or the server's usage when ``n`` is 1.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        body = {
            "prompt": prompt,
            **sampling_fields(sampling, seed, stop),
            "n": n,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reply = await self._post("/v1/completions", body)
        if not reply.choices:
            raise BackendError(f"the server at {self._host} returned no choices", cause="empty")
        return [reply.completion(i, own_usage=n == 1) for i in sorted(reply.choices)[:n]]

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        sampling: Sampling,
        seed: int | None = None,
        abort: AbortCheck | None = None,
        json_schema: dict[str, Any] | None = None,
        think: bool | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "messages": messages,
            **sampling_fields(sampling, seed, None),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if think is not None:
            # The chat template's own switch (Qwen3, DeepSeek-V3.1, ...): llama-server
            # (--jinja), vLLM and SGLang pass it to the template; others ignore it.
            body["chat_template_kwargs"] = {"enable_thinking": think}
        if json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": json_schema, "strict": True},
            }
        return (await self._post("/v1/chat/completions", body, abort)).completion()

    def supports_embed(self) -> bool:
        return True

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of ``texts`` from one ``POST /v1/embeddings``
        (``{"model", "input": [...]}`` -> ``data[i].embedding``, put in input
        order by ``data[i].index``).  The server must serve an embedding model
        (vLLM: ``vllm serve BAAI/bge-m3`` or another pooling model;
        llama.cpp: ``llama-server --embeddings``)."""
        if not texts:
            return []
        await self._ensure_model()
        path = "/v1/embeddings"
        body = {"model": self._model, "input": list(texts), "encoding_format": "float"}
        try:
            resp = await self._client.post(path, json=body)
        except Exception as exc:  # noqa: BLE001 - translated below
            raise self._translate(exc) from exc
        if resp.status_code >= 400:
            err = self._status_error(resp.status_code, resp.content, path)
            if resp.status_code == 501:
                # llama-server without --embeddings: "This server does not
                # support embeddings. Start it with `--embeddings`".
                err = ModelNotFound(
                    f"the server at {self._host} does not serve embeddings "
                    f"({error_message(resp.content)}): run an embedding model there "
                    "(llama-server --embeddings -m EMBEDDING.gguf) and pass its URL as "
                    "--semantic-host"
                )
            elif isinstance(err, ModelNotFound):
                err = ModelNotFound(
                    f"embedding model {self._model!r} is not served by the OpenAI-compatible "
                    f"server at {self._host} ({error_message(resp.content)}); list its models "
                    f"with `curl {self._host}/v1/models`"
                )
            raise err
        try:
            items = sorted(resp.json()["data"], key=lambda d: int(d.get("index") or 0))
            vectors = [[float(x) for x in d["embedding"]] for d in items]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError(
                f"the server at {self._host} sent a malformed {path} reply",
                retryable=False,
                cause="bad_reply",
            ) from None
        if len(vectors) != len(texts):
            raise BackendError(
                f"the server at {self._host} returned {len(vectors)} embeddings for "
                f"{len(texts)} inputs",
                cause="bad_reply",
            )
        return vectors

    render_source = "apply-template"

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """llama.cpp's ``POST /apply-template`` (``{"messages"}`` -> ``{"prompt"}``):
        the server's chat template rendered with the generation prompt, without
        running the model.  None where the server has no such endpoint (vLLM,
        SGLang: their pre-query comes from ``/props``-less marker matching)."""
        data = await self._optional("POST", "/apply-template", {"messages": messages})
        prompt = data.get("prompt") if isinstance(data, dict) else None
        return prompt if isinstance(prompt, str) else None

    async def _props(self) -> dict[str, Any] | None:
        """llama.cpp's ``GET /props``; None where the server has no such page."""
        data = await self._optional("GET", "/props")
        # Some servers answer 200 with an error object for unknown paths.
        if isinstance(data, dict) and ("chat_template" in data or "build_info" in data):
            return data
        return None

    async def _tokens(self, text: str, special: bool) -> list[Any] | None:
        body = {
            "model": self._model,
            # llama.cpp's field names, then vLLM's.
            "content": text,
            "add_special": special,
            "prompt": text,
            "add_special_tokens": special,
        }
        data = await self._optional("POST", "/tokenize", body)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        return tokens if isinstance(tokens, list) else None

    async def _adds_bos(self) -> bool | None:
        """Whether the server puts a special token before a raw prompt (None: unknown)."""
        plain = await self._tokens("Hello", False)
        special = await self._tokens("Hello", True) if plain is not None else None
        if plain is None or special is None:
            return None
        return len(special) > len(plain) and special[1 : 1 + len(plain)] == plain

    async def describe(self) -> ModelInfo:
        served = await self.list_models()
        self._model = self._pick_model(served)
        props = await self._props() or {}
        template = props.get("chat_template") or None
        adds_bos = await self._adds_bos()
        settings = props.get("default_generation_settings") or {}
        extra = {
            "served_models": served,
            "server": "llama.cpp" if props else None,
            "model_path": props.get("model_path"),
            "build_info": props.get("build_info"),
            "n_ctx": settings.get("n_ctx") if isinstance(settings, dict) else None,
            "adds_bos_probed": adds_bos is not None,
        }
        return ModelInfo(
            backend=self.name,
            model=self._model,
            host=self._host,
            template=template if isinstance(template, str) else None,
            template_kind="jinja" if isinstance(template, str) else None,
            bos_token=props.get("bos_token") or None,
            eos_token=props.get("eos_token") or None,
            adds_bos=True if adds_bos is None else adds_bos,
            extra={k: v for k, v in extra.items() if v is not None},
        )

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            await self._client.aclose()
