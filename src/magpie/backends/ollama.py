"""The Ollama backend: the official ``ollama`` client (AsyncClient) over HTTP.

Plain ``http://`` hosts use magpie's lean keep-alive transport
(:mod:`magpie.backends.http_transport`) under the client, and the two requests
of every pair (streamed /api/generate and /api/chat) go as NDJSON straight over
that transport's connections: the same bodies, headers and errors as through
``ollama.AsyncClient``, at a fifth of its CPU per request.  Everything else
(show, tags, version) and every ``https://`` host goes through
``ollama.AsyncClient``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.errors import BackendError, BackendUnavailable, ModelNotFound, UsageError

if TYPE_CHECKING:
    import httpx

    from magpie.backends.http_transport import LeanTransport, RawResponse

DEFAULT_HOST = "http://127.0.0.1:11434"
#: Seconds without a byte from the server before a request fails (and is retried).
DEFAULT_TIMEOUT = 300.0

_SYSTEM_RE = [
    re.compile(r'^SYSTEM\s+"""(.*?)"""', re.S | re.M),
    re.compile(r'^SYSTEM\s+"((?:[^"\\]|\\.)*)"\s*$', re.M),
    re.compile(r"^SYSTEM\s+(.+)$", re.M),
]


def resolve_host(host: str | None) -> str:
    """The host URL as the ollama client resolves it (argument, OLLAMA_HOST, default)."""
    from ollama._client import _parse_host

    return _parse_host(host or os.getenv("OLLAMA_HOST"))


def validate_host(host: str) -> str:
    """Check that ``host`` looks like a URL or host[:port]; return the resolved URL."""
    if (
        not host
        or any(c.isspace() for c in host)
        or "://" in host
        and not host.startswith(("http://", "https://"))
    ):
        raise UsageError(f"--host {host!r} is not a URL: use e.g. http://127.0.0.1:11434")
    try:
        return resolve_host(host)
    except Exception:  # noqa: BLE001 - the client's parser raises various errors
        raise UsageError(f"--host {host!r} is not a URL: use e.g. http://127.0.0.1:11434") from None


def system_from_modelfile(modelfile: str | None) -> str | None:
    """The ``SYSTEM`` prompt of a modelfile as ``ollama show`` prints it."""
    if not modelfile:
        return None
    for rx in _SYSTEM_RE:
        m = rx.search(modelfile)
        if m:
            text = m.group(1)
            if rx is _SYSTEM_RE[1]:
                text = bytes(text, "utf-8").decode("unicode_escape")
            return text
    return None


def _options(sampling: Sampling, seed: int | None, stop: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "num_predict": sampling.max_tokens,
    }
    if sampling.top_k is not None:
        opts["top_k"] = sampling.top_k
    if sampling.repeat_penalty is not None:
        opts["repeat_penalty"] = sampling.repeat_penalty
    if seed is not None:
        opts["seed"] = seed
    if stop:
        opts["stop"] = list(stop)
    return opts


class OllamaBackend(Backend):
    """Talks to ``ollama serve`` through ``ollama.AsyncClient`` (generation
    requests to an ``http://`` host: straight over its connections, see the
    module docstring).

    Requests stream (NDJSON) so that ``timeout`` bounds the silence between two
    chunks, not the length of a generation: a hung server is detected, a long
    answer is not cut.
    """

    name = "ollama"

    def __init__(
        self,
        model: str,
        host: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        keep_alive: str | float | None = None,
        direct_stream: bool = True,
    ) -> None:
        """``direct_stream`` (plain ``http://`` hosts only): stream /api/generate
        and /api/chat as NDJSON straight over the client's connection pool
        instead of through ``ollama.AsyncClient`` (same requests, headers and
        errors; a fifth of the client CPU per request).  Everything else always
        goes through ``ollama.AsyncClient``."""
        import ollama

        self._model = model
        self._host = resolve_host(host)
        self._timeout = timeout
        self._keep_alive = keep_alive
        # Plain http:// goes through magpie's lean keep-alive transport under the
        # official client (httpcore, anyio and h11 cost several times its CPU
        # per streamed request); https://, and hosts that httpx would reach
        # through a proxy from the environment, keep httpx's own transport.
        self._transport: LeanTransport | None = None
        if self._host.startswith("http://"):
            from magpie.backends.http_transport import LeanTransport, env_proxy_applies

            if not env_proxy_applies(self._host):
                self._transport = LeanTransport()
        self._client = ollama.AsyncClient(
            host=self._host, timeout=timeout, transport=self._transport
        )
        self._direct: _Direct | None = None
        if direct_stream and self._transport is not None:
            self._direct = _Direct.for_client(self._client._client, self._transport)  # noqa: SLF001

    @property
    def model(self) -> str:
        return self._model

    @property
    def host(self) -> str:
        return self._host

    # -- error mapping ------------------------------------------------------
    def _translate(self, exc: BaseException) -> Exception:
        import httpx
        import ollama

        if isinstance(exc, ollama.ResponseError):
            code = exc.status_code
            msg = str(exc.error).strip()
            if code == 404:
                return ModelNotFound(
                    f"model {self._model!r} is not on the Ollama server at {self._host}: "
                    f"pull it with `ollama pull {self._model}`"
                )
            if code == -1:
                return BackendError(f"Ollama error mid-stream: {msg}", cause="stream_error")
            if code == 429 or code >= 500 or code == 499:
                return BackendError(f"Ollama answered {code}: {msg}", cause=f"http_{code}")
            return BackendError(
                f"Ollama answered {code}: {msg}", retryable=False, cause=f"http_{code}"
            )
        # The client turns a refused connection into ConnectionError for plain
        # requests, but streaming requests raise httpx.ConnectError as it is.
        if isinstance(exc, ConnectionError | httpx.ConnectError):
            return BackendUnavailable(
                f"Ollama is not reachable at {self._host}: start it with `ollama serve` "
                "(or pass --host / set OLLAMA_HOST)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(
                f"Ollama at {self._host} sent nothing for {self._timeout:g} s", cause="timeout"
            )
        if isinstance(exc, httpx.TransportError):
            return BackendError(
                f"connection to Ollama at {self._host} failed: {exc.__class__.__name__}",
                cause="connection",
            )
        return exc  # type: ignore[return-value]

    async def _stream_direct(
        self,
        path: str,
        payload: dict[str, Any],
        piece: Callable[[dict[str, Any]], str],
        abort: AbortCheck | None,
    ) -> Completion:
        """:meth:`_stream` without ``ollama.AsyncClient``: the same request body
        and headers, NDJSON parsed with ``json``, the same errors
        (``ollama.ResponseError`` for HTTP errors and error lines, httpx's
        transport errors), mapped by :meth:`_translate`."""
        import ollama

        assert self._direct is not None
        text = ""
        chunks = 0
        last: dict[str, Any] | None = None
        try:
            resp = await self._direct.post(path, payload, self._timeout)
            try:
                if resp.status >= 400:
                    body = (await resp.aread()).decode("utf-8", "replace")
                    raise ollama.ResponseError(body, resp.status)
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    try:
                        part = json.loads(line)
                    except ValueError:
                        raise BackendError(
                            f"Ollama sent a line that is not JSON: {line[:80]!r}",
                            cause="stream_error",
                        ) from None
                    if err := part.get("error"):
                        raise ollama.ResponseError(err)
                    text += piece(part)
                    chunks += 1
                    last = part
                    if abort is not None and not part.get("done") and abort(text):
                        return Completion(
                            text=text, finish_reason="abort", completion_tokens=chunks
                        )
            finally:
                await resp.aclose()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if last is None or not last.get("done"):
            raise BackendError("Ollama closed the stream before it was done", cause="connection")
        reason = last.get("done_reason") or "unknown"
        return Completion(
            text=text,
            finish_reason=reason if reason in ("stop", "length") else "unknown",
            prompt_tokens=last.get("prompt_eval_count"),
            completion_tokens=last.get("eval_count"),
        )

    async def _stream(self, call: Any, piece: Any, abort: AbortCheck | None) -> Completion:
        """Run a streaming request and gather its chunks into one Completion.

        When ``abort`` says so, the stream is closed (Ollama then cancels the
        generation) and the text so far comes back with finish reason "abort".
        """
        text = ""
        chunks = 0
        last = None
        try:
            stream = await call()
            try:
                async for chunk in stream:
                    text += piece(chunk)
                    chunks += 1
                    last = chunk
                    if abort is not None and not chunk.done and abort(text):
                        # One chunk per token: the count stands in for eval_count.
                        return Completion(
                            text=text, finish_reason="abort", completion_tokens=chunks
                        )
            finally:
                await stream.aclose()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if last is None or not last.done:
            raise BackendError("Ollama closed the stream before it was done", cause="connection")
        reason = last.done_reason or "unknown"
        return Completion(
            text=text,
            finish_reason=reason if reason in ("stop", "length") else "unknown",
            prompt_tokens=last.prompt_eval_count,
            completion_tokens=last.eval_count,
        )

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
        options = _options(sampling, seed, stop)
        if self._direct is not None:
            payload: dict[str, Any] = {
                "model": self._model,
                "prompt": prompt,
                "stream": True,
                "raw": True,
                "options": options,
            }
            if self._keep_alive is not None:
                payload["keep_alive"] = self._keep_alive
            result = await self._stream_direct(
                "/api/generate", payload, lambda c: c.get("response") or "", abort
            )
        else:
            result = await self._stream(
                lambda: self._client.generate(
                    model=self._model,
                    prompt=prompt,
                    raw=True,
                    options=options,
                    stream=True,
                    keep_alive=self._keep_alive,
                ),
                lambda c: c.response or "",
                abort,
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
    ) -> Completion:
        options = _options(sampling, seed, None)
        if self._direct is not None:
            payload: dict[str, Any] = {
                "model": self._model,
                "stream": True,
                "messages": messages,
                "options": options,
            }
            if json_schema is not None:
                payload["format"] = json_schema
            if self._keep_alive is not None:
                payload["keep_alive"] = self._keep_alive
            payload["tools"] = []  # as ollama.AsyncClient.chat sends it
            return await self._stream_direct(
                "/api/chat",
                payload,
                lambda c: (c.get("message") or {}).get("content") or "",
                abort,
            )
        return await self._stream(
            lambda: self._client.chat(
                model=self._model,
                messages=messages,
                options=options,
                format=json_schema,
                stream=True,
                keep_alive=self._keep_alive,
            ),
            lambda c: (c.message.content or "") if c.message else "",
            abort,
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
        try:
            resp = await self._client.embed(
                model=self._model, input=texts, truncate=True, keep_alive=self._keep_alive
            )
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
        try:
            resp = await self._client._request_raw("GET", "/api/version")  # noqa: SLF001
            return str(resp.json().get("version", "unknown"))
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            resp = await self._client.list()
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc
        return [m.model_dump() for m in resp.models]

    async def describe(self) -> ModelInfo:
        try:
            show = await self._client.show(self._model)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc
        digest = None
        for m in await self.list_models():
            if m.get("model") in (self._model, f"{self._model}:latest"):
                digest = m.get("digest")
                break
        details = show.details.model_dump() if show.details else {}
        return ModelInfo(
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

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            await self._client.close()


class _Direct:
    """POSTs of JSON to one Ollama server over a :class:`LeanTransport`, with
    what ``ollama.AsyncClient`` would send: its headers (User-Agent, Accept,
    Content-Type, ``Authorization`` from OLLAMA_API_KEY) bar Accept-Encoding
    (Ollama's NDJSON is not compressed anyway), and the body as httpx encodes
    ``json=`` (compact, UTF-8)."""

    def __init__(
        self,
        transport: LeanTransport,
        origin: tuple[str, int],
        host: str,
        prefix: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        from magpie.backends.http_transport import request_head

        self._transport = transport
        self._origin = origin
        self._heads = {
            path: request_head("POST", prefix + path, host, headers)
            for path in ("/api/generate", "/api/chat")
        }

    @classmethod
    def for_client(cls, client: httpx.AsyncClient, transport: LeanTransport) -> _Direct | None:
        """For the ``httpx.AsyncClient`` under an ``ollama.AsyncClient``; None
        when that client would not send its requests through ``transport``
        (a proxy from the environment, a non-http URL)."""
        base = client.base_url
        try:
            if base.scheme != "http" or client._transport_for_url(base) is not transport:  # noqa: SLF001
                return None
        except Exception:  # noqa: BLE001 - another httpx: keep the official path
            return None
        name = f"[{base.host}]" if ":" in base.host else base.host  # IPv6 literal
        host = name if base.port is None else f"{name}:{base.port}"
        headers = [(k, v) for k, v in client.headers.raw if k.lower() != b"accept-encoding"]
        prefix = base.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        return cls(transport, (base.host, base.port or 80), host, prefix, headers)

    async def post(self, path: str, payload: dict[str, Any], timeout: float) -> RawResponse:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        data = body.encode("utf-8")
        return await self._transport.exchange(
            self._origin,
            self._heads[path] + b"Content-Length: %d\r\n\r\n" % len(data) + data,
            "POST",
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
        )
