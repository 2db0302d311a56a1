"""The Ollama backend: :class:`OllamaBackend` (see :mod:`magpie.backends.ollama`)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.backends.http import (
    AioSession,
    Overflow,
    context_overflow,
    retryable_status,
    transport_failure,
)
from magpie.backends.ollama.generate import (
    NO_CUTS,
    NOT_SENT,
    client_stream,
    request_options,
    stream_client,
    stream_direct,
)
from magpie.backends.ollama.hosts import host_credentials, resolve_host
from magpie.backends.ollama.show import (
    has_model,
    renders_templates,
    stops_from_parameters,
    system_from_modelfile,
)
from magpie.errors import BackendError, BackendUnavailable, ContextOverflow, ModelNotFound

#: Seconds without a byte from the server (on any request of the run) before a
#: request fails and is retried.
DEFAULT_TIMEOUT = 300.0
#: Statuses worth a retry besides 5xx: rate limit, a request the server closed.
_RETRYABLE_STATUS = frozenset({429, 499})

T = TypeVar("T")


class OllamaBackend(Backend):
    """Talks to ``ollama serve``: generation requests over aiohttp (see
    :mod:`magpie.backends.ollama`), everything else through ``ollama.AsyncClient``.

    Requests stream (NDJSON) so that ``timeout`` bounds the silence between two
    chunks, not the length of a generation: a hung server is detected, a long
    answer is not cut.
    """

    name = "ollama"
    #: A server queues what it cannot run in parallel; a few requests in flight
    #: hide the client's own latency.
    auto_concurrency = 4

    def __init__(
        self,
        model: str,
        host: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        keep_alive: str | float | None = None,
        direct_stream: bool = True,
        num_ctx: int | None = None,
    ) -> None:
        """``direct_stream``: stream /api/generate and /api/chat as NDJSON over
        aiohttp (the default) instead of through ``ollama.AsyncClient`` (same
        requests, headers and errors; about a fifth of the client CPU per
        request).  Everything else always goes through ``ollama.AsyncClient``.

        ``num_ctx``: the context to load the model with (``options.num_ctx`` of
        every request; ``--num-ctx``); None leaves it to the Modelfile's
        ``PARAMETER num_ctx`` or the server's default.  Every generation request
        sends ``truncate`` and ``shift`` false (:data:`NO_CUTS`): a prompt that
        does not fit raises :class:`~magpie.errors.ContextOverflow`."""
        import ollama

        host, auth = host_credentials(host)
        self._model = model
        self._host = resolve_host(host)
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._num_ctx = num_ctx
        self._client = ollama.AsyncClient(host=self._host, timeout=timeout, headers=auth)
        self._direct: AioSession | None = None
        self._renders: bool | None = None  # whether the server renders on request
        if direct_stream:
            httpx_client = self._client._client  # noqa: SLF001 - its base URL and headers
            self._direct = AioSession(
                str(httpx_client.base_url),
                {k: v for k, v in httpx_client.headers.items() if k.lower() not in NOT_SENT},
                timeout,
            )

    @property
    def model(self) -> str:
        return self._model

    @property
    def host(self) -> str:
        return self._host

    # -- error mapping ------------------------------------------------------
    def _overflow(
        self, found: Overflow, max_tokens: int | None = None, note: str = ""
    ) -> ContextOverflow:
        """The error of a prompt the server refused as too long for the context
        (``note``: how it was found, where the server did not refuse it)."""
        wanted = ""
        if found.prompt_tokens is not None and max_tokens is not None:
            # Room for the prompt and the answer asked for, in steps of 1024.
            wanted = f" {-(-(found.prompt_tokens + max_tokens) // 1024) * 1024}"
        now = (
            f"now {self._num_ctx}"
            if self._num_ctx is not None
            else "not set: the Modelfile's or the server's default"
        )
        return ContextOverflow(
            f"the prompt does not fit the context of {self._model!r} on Ollama at "
            f"{self._host} ({found.counts()}){note}",
            prompt_tokens=found.prompt_tokens,
            context=found.context,
            fix=f"raise the context with --num-ctx{wanted or ' N'} ({now}; sent as "
            f"options.num_ctx) or `PARAMETER num_ctx{wanted or ' N'}` in the model's "
            "Modelfile, or ask for less (--turns, --response-max-tokens)",
        )

    def _checked(self, result: Completion, options: dict[str, Any]) -> Completion:
        """``result``, unless the server cut its prompt: one older than 0.12.6
        ignores ``truncate`` and cuts a prompt that does not fit to exactly the
        context, which it then reports as ``prompt_eval_count``; where the
        context is known (``num_ctx``), such a count is an overflow."""
        if (
            self._num_ctx is not None
            and result.prompt_tokens is not None
            and result.prompt_tokens >= self._num_ctx
        ):
            raise self._overflow(
                Overflow(None, self._num_ctx, ""),
                options.get("num_predict"),
                f"; the server cut it to {result.prompt_tokens} tokens (an Ollama older "
                "than 0.12.6 ignores truncate: update it)",
            )
        return result

    def _translate(self, exc: BaseException, max_tokens: int | None = None) -> Exception:
        import ollama

        if isinstance(exc, ollama.ResponseError):
            code = exc.status_code
            msg = str(exc.error).strip()
            found = context_overflow(code, msg)
            if found is not None:
                return self._overflow(found, max_tokens)
            if code == 404:
                return ModelNotFound(
                    f"model {self._model!r} is not on the Ollama server at {self._host}: "
                    f"pull it with `ollama pull {self._model}`"
                )
            if code == -1:
                return BackendError(f"Ollama error mid-stream: {msg}", cause="stream_error")
            return BackendError(
                f"Ollama answered {code}: {msg}",
                retryable=retryable_status(code, _RETRYABLE_STATUS),
                cause=f"http_{code}",
            )
        failure = transport_failure(exc, watchdog=True)
        if failure is None and isinstance(exc, ConnectionError):
            # The client turns a refused connection into ConnectionError for
            # plain requests (streaming ones raise httpx.ConnectError as it is).
            failure = "unreachable"
        if failure == "unreachable":
            return self._unreachable()
        if failure == "timeout":
            return self._timed_out()
        if failure == "connection":
            return self._connection_failed(exc)
        return exc  # type: ignore[return-value]

    def _unreachable(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"Ollama is not reachable at {self._host}",
            fix="start it with `ollama serve` (or pass --host / set OLLAMA_HOST to where it runs)",
        )

    def _timed_out(self) -> BackendError:
        return BackendError(
            f"Ollama at {self._host} sent nothing for {self._timeout:g} s", cause="timeout"
        )

    def _connection_failed(self, exc: BaseException) -> BackendError:
        return BackendError(
            f"connection to Ollama at {self._host} failed: {exc.__class__.__name__}",
            cause="connection",
        )

    async def _ask(self, call: Callable[[], Awaitable[T]]) -> T:
        """One request of the official client that is not a generation (version,
        tags, show, the render): its errors translated (:meth:`_translate`), and
        retried by itself as a start-up request (:meth:`Backend._start_request`)."""

        async def once() -> T:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - translated below
                translated = self._translate(exc)
                if translated is exc:
                    raise
                raise translated from exc

        return await self._start_request(once)

    async def _stream_direct(
        self,
        path: str,
        payload: dict[str, Any],
        piece: Any,
        abort: AbortCheck | None,
        thought: Any = None,
    ) -> Completion:
        """:meth:`_stream` over the shared aiohttp session instead of
        ``ollama.AsyncClient`` (:func:`~magpie.backends.ollama.generate.stream_direct`),
        its errors mapped by :meth:`_translate`."""
        assert self._direct is not None
        options = payload["options"]
        try:
            result = await stream_direct(self._direct, path, payload, piece, abort, thought)
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc, options.get("num_predict"))
            if translated is exc:
                raise
            raise translated from exc
        return self._checked(result, options)

    async def _stream(
        self,
        path: str,
        body: dict[str, Any],
        piece: Any,
        abort: AbortCheck | None,
        thought: Any = None,
    ) -> Completion:
        """Stream ``body`` to ``path`` through ``ollama.AsyncClient`` and gather
        its chunks into one Completion (:func:`~magpie.backends.ollama.generate.stream_client`)."""
        options = body["options"]
        try:
            result = await stream_client(
                lambda: client_stream(self._client, path, body), piece, abort, thought
            )
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc, options.get("num_predict"))
            if translated is exc:
                raise
            raise translated from exc
        return self._checked(result, options)

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
        options = request_options(sampling, seed, stop, self._num_ctx)
        if self._direct is not None:
            payload: dict[str, Any] = {
                "model": self._model,
                "prompt": prompt,
                "stream": True,
                "raw": True,
                "options": options,
                # Otherwise Ollama parses a thinking model's raw output too (think
                # defaults to true) and moves text it takes for thinking out of
                # "response": an instruction must come back as written.
                "think": False,
                **NO_CUTS,
            }
            if self._keep_alive is not None:
                payload["keep_alive"] = self._keep_alive
            result = await self._stream_direct(
                "/api/generate", payload, lambda c: c.get("response") or "", abort
            )
        else:
            from ollama._types import GenerateRequest

            body = GenerateRequest(
                model=self._model,
                prompt=prompt,
                raw=True,
                options=options,
                stream=True,
                keep_alive=self._keep_alive,
                think=False,
            ).model_dump(exclude_none=True)
            result = await self._stream(
                "/api/generate", {**body, **NO_CUTS}, lambda c: c.response or "", abort
            )
        if not result.text and not result.completion_tokens:
            # Concurrent raw requests against a cold model can come back empty
            # with status 200; that is worth another try.
            raise BackendError("Ollama returned an empty raw response", cause="empty")
        return result

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
        options = request_options(sampling, seed, None, self._num_ctx)
        if self._direct is not None:
            payload: dict[str, Any] = {
                "model": self._model,
                "stream": True,
                "messages": messages,
                "options": options,
                **NO_CUTS,
            }
            if json_schema is not None:
                payload["format"] = json_schema
            if think is not None:
                payload["think"] = think
            if self._keep_alive is not None:
                payload["keep_alive"] = self._keep_alive
            payload["tools"] = []  # as ollama.AsyncClient.chat sends it
            return await self._stream_direct(
                "/api/chat",
                payload,
                lambda c: (c.get("message") or {}).get("content") or "",
                abort,
                lambda c: (c.get("message") or {}).get("thinking") or "",
            )
        from ollama._types import ChatRequest

        body = ChatRequest(
            model=self._model,
            messages=messages,
            tools=[],
            options=options,
            format=json_schema,
            stream=True,
            keep_alive=self._keep_alive,
            think=think,
        ).model_dump(exclude_none=True)
        return await self._stream(
            "/api/chat",
            {**body, **NO_CUTS},
            lambda c: (c.message.content or "") if c.message else "",
            abort,
            lambda c: (c.message.thinking or "") if c.message else "",
        )

    def supports_embed(self) -> bool:
        return True

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of ``texts`` from one ``POST /api/embed`` (``AsyncClient.embed``).

        ``self.model`` is the embedding model (e.g. ``nomic-embed-text``).
        ``truncate`` is sent as true (Ollama's default, explicit: an input longer
        than the model's context is cut, not refused with 400), ``keep_alive``
        as for generation (None: the server's default, 5 minutes; ``0`` would
        unload the model after every request).  Ollama answers one normalised
        vector per input, in input order.  Errors map as for generation (404:
        ModelNotFound with the ``ollama pull`` hint)."""
        if not texts:
            return []
        import ollama

        try:
            resp = await self._client.embed(
                model=self._model, input=texts, truncate=True, keep_alive=self._keep_alive
            )
        except ollama.ResponseError as exc:
            if exc.status_code == 501 or (
                exc.status_code == 400 and "embed" in str(exc.error).lower()
            ):
                # A generative model: Ollama's runner was not started for
                # embeddings (its text says "Start it with --embeddings").
                raise ModelNotFound(
                    f"model {self._model!r} on the Ollama server at {self._host} cannot embed "
                    "(it is not an embedding model): pass an embedding model, e.g. "
                    "`ollama pull nomic-embed-text` then --semantic-model nomic-embed-text"
                ) from exc
            raise self._translate(exc) from exc
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        vectors = [list(v) for v in resp.embeddings or []]
        if len(vectors) != len(texts):
            raise BackendError(
                f"Ollama returned {len(vectors)} embeddings for {len(texts)} inputs",
                cause="bad_reply",
            )
        return vectors

    async def version(self) -> str:
        """The server's version; raises BackendUnavailable when it is down."""
        resp = await self._ask(
            lambda: self._client._request_raw("GET", "/api/version")  # noqa: SLF001
        )
        return str(resp.json().get("version", "unknown"))

    async def probe(self) -> str:
        try:
            version = await self.version()
        except (BackendUnavailable, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001 - a server that is not Ollama
            raise BackendUnavailable(
                f"something answers at {self._host}, but not as Ollama does "
                f"({exc.__class__.__name__}: {str(exc)[:120]})",
                fix="pass --host with the URL of an Ollama server (default http://127.0.0.1:11434)",
            ) from None
        return f"Ollama {version} at {self._host}"

    async def check_model(self) -> tuple[ModelInfo, str]:
        names = sorted(str(m.get("model") or m.get("name")) for m in await self.list_models())
        if not has_model(names, self._model):
            others = f", or pass --model with one of: {', '.join(names)}" if names else ""
            raise ModelNotFound(
                f"model {self._model!r} is not on the Ollama server at {self._host} "
                f"(pulled: {', '.join(names) or 'none'})",
                fix=f"pull it with `ollama pull {self._model}`{others}",
            )
        try:
            info = await self.describe()
        except ModelNotFound:
            raise ModelNotFound(
                f"model {self._model!r} is listed but /api/show does not know it",
                fix=f"pull it again with `ollama pull {self._model}`",
            ) from None
        details = info.extra.get("details") or {}
        facts = [
            f"{details.get(k)}"
            for k in ("family", "parameter_size", "quantization_level")
            if details.get(k)
        ]
        digest = f", digest {info.digest[:19]}" if info.digest else ""
        summary = f"{self._model} on {self._host}"
        return info, summary + (f" ({', '.join(facts)})" if facts else "") + digest

    async def list_models(self) -> list[dict[str, Any]]:
        resp = await self._ask(self._client.list)
        return [m.model_dump() for m in resp.models]

    async def describe(self) -> ModelInfo:
        show = await self._ask(lambda: self._client.show(self._model))
        digest = None
        for m in await self.list_models():
            if m.get("model") in (self._model, f"{self._model}:latest"):
                digest = m.get("digest")
                break
        details = show.details.model_dump() if show.details else {}
        caps = getattr(show, "capabilities", None)
        return ModelInfo(
            stop=stops_from_parameters(show.parameters),
            capabilities=list(caps) if caps is not None else None,
            backend=self.name,
            model=self._model,
            host=self._host,
            template=show.template,
            template_kind="go" if show.template else None,
            system=system_from_modelfile(show.modelfile),
            family=details.get("family"),
            digest=digest,
            adds_bos=True,
            extra={"details": details, "parameters": show.parameters or ""},
        )

    render_source = "ollama-render"

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """``POST /api/chat`` with ``_debug_render_only`` (Ollama 0.11.5 and
        later): the rendered prompt, without running the model.  An older server
        ignores the field and would answer: one token at most is asked for, and
        a reply without ``_debug_info`` means None (fall back to markers).
        A server that reports an older version is not asked."""
        if self._renders is None:
            self._renders = renders_templates(await self.version())
        if not self._renders:
            return None
        body = {
            "model": self._model,
            "messages": messages,
            "stream": False,
            "_debug_render_only": True,
            # Not cut: with truncate on, Ollama drops the first messages of a
            # conversation longer than the context from the render too.  And
            # the model is loaded for a render: num_ctx and shift as for
            # generation, or the next request reloads it.
            "options": {"num_predict": 1}
            | ({"num_ctx": self._num_ctx} if self._num_ctx is not None else {}),
            **NO_CUTS,
        }
        try:
            resp = await self._ask(
                lambda: self._client._request_raw("POST", "/api/chat", json=body)  # noqa: SLF001
            )
        except BackendError as exc:
            if not exc.retryable:
                return None  # 400: e.g. a model that cannot chat (an embedder)
            raise
        info = resp.json().get("_debug_info")
        rendered = info.get("rendered_template") if isinstance(info, dict) else None
        return rendered if isinstance(rendered, str) else None

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        with contextlib.suppress(Exception):  # closing is best effort
            await self._client.close()
