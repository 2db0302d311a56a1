"""The Ollama backend: the official ``ollama`` client, and aiohttp for generation.

The two requests of every pair (streamed /api/generate and /api/chat) go as
NDJSON over one ``aiohttp.ClientSession`` per backend (keep-alive pool, C HTTP
parser): the same bodies, headers and errors as through ``ollama.AsyncClient``,
whose httpx stack costs several times the CPU per streamed request.  Everything
else (show, tags, version, embed), and generation with ``direct_stream=False``,
goes through ``ollama.AsyncClient`` on httpx's own transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.errors import BackendError, BackendUnavailable, ModelNotFound, UsageError

if TYPE_CHECKING:
    import aiohttp

DEFAULT_HOST = "http://127.0.0.1:11434"
#: Seconds without a byte from the server (on any request of the run) before a
#: request fails and is retried.
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
        url = resolve_host(host)
    except Exception:  # noqa: BLE001 - the client's parser raises various errors
        raise UsageError(f"--host {host!r} is not a URL: use e.g. http://127.0.0.1:11434") from None
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    if path == "/api" or path.startswith("/api/"):
        base = url[: url.index(path)]
        raise UsageError(
            f"--host {host!r} ends in an API path ({path}): give the server's base URL, "
            f"such as {base}"
        )
    return url


def host_credentials(host: str | None) -> tuple[str | None, dict[str, str]]:
    """``host`` without ``user:password@``, and the Basic authorization header
    for them (the ollama client drops credentials from a URL; a server behind
    an authenticating proxy needs them sent)."""
    if not host or "@" not in host:
        return host, {}
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "", host
    netloc, slash, tail = rest.partition("/")
    if "@" not in netloc:
        return host, {}
    userinfo, _, hostport = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(
        f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    ).decode()
    bare = (f"{scheme}://" if sep else "") + hostport + (slash + tail if slash else "")
    return bare, {"Authorization": f"Basic {token}"}


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


_STOP_RE = re.compile(r'^stop\s+(?:"((?:[^"\\]|\\.)*)"|(\S.*?))\s*$', re.M)


def stops_from_parameters(parameters: str | None) -> list[str]:
    """The ``stop`` values of ``/api/show``'s ``parameters`` text."""
    out: list[str] = []
    for m in _STOP_RE.finditer(parameters or ""):
        value = m.group(1)
        if value is not None:
            value = json.loads(f'"{value}"') if "\\" in value else value
        else:
            value = m.group(2)
        if value and value not in out:
            out.append(value)
    return out


#: The first Ollama that answers ``_debug_render_only`` (ollama/ollama 8de1da4).
RENDER_SINCE = (0, 11, 5)


def renders_templates(version: str) -> bool:
    """Whether an Ollama of ``version`` renders templates on request; a
    development build ("0.0.0", unparsable) is taken to be new."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        return True
    parts = tuple(int(x) for x in m.groups())
    return parts == (0, 0, 0) or parts >= RENDER_SINCE


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


def _has_model(names: list[str], model: str) -> bool:
    """Whether ``model`` is among Ollama's ``names`` (``x`` is ``x:latest``)."""

    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return norm(model) in {norm(n) for n in names}


class OllamaBackend(Backend):
    """Talks to ``ollama serve``: generation requests over aiohttp (see the
    module docstring), everything else through ``ollama.AsyncClient``.

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
    ) -> None:
        """``direct_stream``: stream /api/generate and /api/chat as NDJSON over
        aiohttp (the default) instead of through ``ollama.AsyncClient`` (same
        requests, headers and errors; about a fifth of the client CPU per
        request).  Everything else always goes through ``ollama.AsyncClient``."""
        import ollama

        host, auth = host_credentials(host)
        self._model = model
        self._host = resolve_host(host)
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._client = ollama.AsyncClient(host=self._host, timeout=timeout, headers=auth)
        self._direct: _Direct | None = None
        self._renders: bool | None = None  # whether the server renders on request
        if direct_stream:
            httpx_client = self._client._client  # noqa: SLF001 - its base URL and headers
            self._direct = _Direct(
                str(httpx_client.base_url),
                {k: v for k, v in httpx_client.headers.items() if k.lower() not in _NOT_SENT},
                timeout,
            )

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
        # aiohttp's first: some of its errors are also builtin ConnectionErrors
        # (a reset mid-stream is not an unreachable server).  It is imported
        # only where the direct path ran: no aiohttp module, no aiohttp error.
        aiohttp = sys.modules.get("aiohttp")
        if aiohttp is not None:
            if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS, proxy
                return self._unreachable()
            if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
                return self._timed_out()
            if isinstance(exc, aiohttp.ClientError):  # disconnected, payload, reset
                return self._connection_failed(exc)
        # The client turns a refused connection into ConnectionError for plain
        # requests, but streaming requests raise httpx.ConnectError as it is.
        if isinstance(exc, ConnectionError | httpx.ConnectError):
            return self._unreachable()
        if isinstance(exc, httpx.TimeoutException):
            return self._timed_out()
        if isinstance(exc, httpx.TransportError):
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

    async def _stream_direct(
        self,
        path: str,
        payload: dict[str, Any],
        piece: Callable[[dict[str, Any]], str],
        abort: AbortCheck | None,
        thought: Callable[[dict[str, Any]], str] | None = None,
    ) -> Completion:
        """:meth:`_stream` over aiohttp instead of ``ollama.AsyncClient``: the
        same request body and headers, NDJSON parsed with ``json``, the same
        errors (``ollama.ResponseError`` for HTTP errors and error lines),
        mapped by :meth:`_translate`."""
        import ollama

        assert self._direct is not None
        text = thinking = ""
        chunks = 0
        last: dict[str, Any] | None = None
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        resp: aiohttp.ClientResponse | None = None
        complete = False  # the body was read to its end: the connection is pooled
        try:
            try:
                with self._direct.watchdog() as watchdog:
                    resp = await self._direct.post(path, data.encode("utf-8"))
                    watchdog.tick()
                    if resp.status >= 400:
                        body = (await resp.read()).decode("utf-8", "replace")
                        raise ollama.ResponseError(body, resp.status)
                    reader = resp.content
                    rest = b""
                    while True:
                        block = await reader.readany()
                        if not block:
                            break
                        watchdog.tick()
                        if rest:
                            block = rest + block
                        lines = block.split(b"\n")
                        rest = lines.pop()
                        for line in lines:
                            if not line or line.isspace():
                                continue
                            part = _json_line(line)
                            if err := part.get("error"):
                                raise ollama.ResponseError(err)
                            text += piece(part)
                            if thought is not None:
                                thinking += thought(part)
                            chunks += 1
                            last = part
                            if (
                                abort is not None
                                and not part.get("done")
                                and abort(thinking + text)
                            ):
                                # One chunk per token: the count stands in for eval_count.
                                return Completion(
                                    text=text,
                                    finish_reason="abort",
                                    completion_tokens=chunks,
                                    thinking=thinking or None,
                                )
                complete = True
                if rest and not rest.isspace():  # a last line without its newline
                    part = _json_line(rest)
                    if err := part.get("error"):
                        raise ollama.ResponseError(err)
                    text += piece(part)
                    if thought is not None:
                        thinking += thought(part)
                    chunks += 1
                    last = part
            finally:
                # Closed before its end (an abort, an error, a cancellation): the
                # connection goes, and Ollama cancels the generation.
                if resp is not None and not complete:
                    resp.close()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if last is None or not last.get("done"):
            # The body ended cleanly (a torn one raises above) without a done
            # line: Ollama's repeat guard cut the generation.
            return Completion(
                text=text,
                finish_reason="repeat",
                completion_tokens=chunks,
                thinking=thinking or None,
            )
        reason = last.get("done_reason") or "unknown"
        return Completion(
            text=text,
            finish_reason=reason if reason in ("stop", "length") else "unknown",
            prompt_tokens=last.get("prompt_eval_count"),
            completion_tokens=last.get("eval_count"),
            thinking=thinking or None,
        )

    async def _stream(
        self, call: Any, piece: Any, abort: AbortCheck | None, thought: Any = None
    ) -> Completion:
        """Run a streaming request and gather its chunks into one Completion.

        When ``abort`` says so, the stream is closed (Ollama then cancels the
        generation) and the text so far comes back with finish reason "abort".
        """
        text = thinking = ""
        chunks = 0
        last = None
        try:
            stream = await call()
            try:
                async for chunk in stream:
                    text += piece(chunk)
                    if thought is not None:
                        thinking += thought(chunk)
                    chunks += 1
                    last = chunk
                    if abort is not None and not chunk.done and abort(thinking + text):
                        # One chunk per token: the count stands in for eval_count.
                        return Completion(
                            text=text,
                            finish_reason="abort",
                            completion_tokens=chunks,
                            thinking=thinking or None,
                        )
            finally:
                await stream.aclose()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if last is None or not last.done:
            # A clean end without a done line: Ollama's repeat guard cut it.
            return Completion(
                text=text,
                finish_reason="repeat",
                completion_tokens=chunks,
                thinking=thinking or None,
            )
        reason = last.done_reason or "unknown"
        return Completion(
            text=text,
            finish_reason=reason if reason in ("stop", "length") else "unknown",
            prompt_tokens=last.prompt_eval_count,
            completion_tokens=last.eval_count,
            thinking=thinking or None,
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
                # Otherwise Ollama parses a thinking model's raw output too (think
                # defaults to true) and moves text it takes for thinking out of
                # "response": an instruction must come back as written.
                "think": False,
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
                    think=False,
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
        think: bool | None = None,
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
        return await self._stream(
            lambda: self._client.chat(
                model=self._model,
                messages=messages,
                options=options,
                format=json_schema,
                stream=True,
                keep_alive=self._keep_alive,
                think=think,
            ),
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
        try:
            resp = await self._client._request_raw("GET", "/api/version")  # noqa: SLF001
            return str(resp.json().get("version", "unknown"))
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc

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
        if not _has_model(names, self._model):
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
        try:
            resp = await self._client._request_raw(  # noqa: SLF001 - a plain POST
                "POST",
                "/api/chat",
                json={
                    "model": self._model,
                    "messages": messages,
                    "stream": False,
                    "_debug_render_only": True,
                    "options": {"num_predict": 1},
                },
            )
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if isinstance(translated, BackendError) and not translated.retryable:
                return None  # 400: e.g. a model that cannot chat (an embedder)
            raise translated from exc
        info = resp.json().get("_debug_info")
        rendered = info.get("rendered_template") if isinstance(info, dict) else None
        return rendered if isinstance(rendered, str) else None

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        with contextlib.suppress(Exception):  # closing is best effort
            await self._client.close()


#: Headers of the official client's httpx client that the direct path does not
#: send as they are: aiohttp writes Host, Content-Length and Connection itself,
#: and no Accept-Encoding asks for identity bodies (Ollama does not compress
#: NDJSON; a compressing proxy in between would hold lines back).
_NOT_SENT = frozenset({"accept-encoding", "connection", "content-length", "host"})


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        part = json.loads(line)
    except ValueError:
        part = None
    if not isinstance(part, dict):
        raise BackendError(
            f"Ollama sent a line that is not a JSON object: {line[:80]!r}", cause="stream_error"
        )
    return part


class _Direct:
    """POSTs of JSON to one Ollama server over an ``aiohttp.ClientSession``.

    The session is made on first use, in the running event loop (a new one if
    the loop changed), with what ``ollama.AsyncClient`` would use: its headers
    (User-Agent, Accept, Content-Type, ``Authorization`` from OLLAMA_API_KEY)
    bar Accept-Encoding, the proxy the environment names for the host
    (HTTP_PROXY, HTTPS_PROXY, NO_PROXY; looked up once, as httpx does when a
    client is made), httpx's certificate store for ``https://`` (certifi, or
    SSL_CERT_FILE / SSL_CERT_DIR), keep-alive connections without a limit on
    their number (the server bounds its own parallelism), and ``timeout`` for
    connecting and for each wait for the next bytes, never for a whole answer.

    ``timeout`` is the server's silence, not one request's: a request fails
    (:meth:`alive`) once no request of this session has received a byte for
    ``timeout`` seconds.  A request queued behind ``OLLAMA_NUM_PARALLEL`` gets no
    bytes until a slot frees, however long the requests before it run; while
    they stream, the server is alive and the queued request waits.
    """

    #: Seconds an idle connection stays in the pool (httpx's default).
    KEEPALIVE_EXPIRY = 5.0

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        self._base = base_url.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        #: When a request of this session last received bytes (loop time).
        self.last_progress = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._urls: dict[str, Any] = {}
        self._proxy: Any = None
        self._proxy_auth: Any = None
        #: Extra ``aiohttp.TraceConfig``s for the next session (tests count connections).
        self.trace_configs: list[Any] = []

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp
        from yarl import URL

        base = URL(self._base)
        ssl: Any = True
        if base.scheme == "https":
            with contextlib.suppress(Exception):  # the official client's trust store
                import httpx

                ssl = httpx.create_ssl_context()
        try:
            from aiohttp.helpers import get_env_proxy_for_url

            self._proxy, self._proxy_auth = get_env_proxy_for_url(base)
        except LookupError:  # no proxy for this host
            self._proxy, self._proxy_auth = None, None
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self.KEEPALIVE_EXPIRY, ssl=ssl)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            skip_auto_headers=("Accept-Encoding",),
            # Reads are timed by alive(): the server's silence, not a socket's.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=None),
            trace_configs=list(self.trace_configs) or None,
        )

    def watchdog(self) -> _Watchdog:
        """A request's timer: see :class:`_Watchdog`."""
        return _Watchdog(self)

    async def post(self, path: str, data: bytes) -> aiohttp.ClientResponse:
        """Send ``data`` (JSON) to ``path``; the response once its head is in."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            await self.aclose()
            self._session, self._loop = self._open(), loop
        url = self._urls.get(path)
        if url is None:
            from yarl import URL

            url = self._urls[path] = URL(self._base + path)
        return await self._session.post(
            url, data=data, proxy=self._proxy, proxy_auth=self._proxy_auth
        )

    async def aclose(self) -> None:
        """Close the session: from its own event loop, or once that loop is
        closed (its connections are then left to the garbage collector); a
        session whose loop still runs elsewhere is left alone."""
        session, self._session = self._session, None
        loop = self._loop
        if session is None or loop is None:
            return
        if loop is asyncio.get_running_loop() or loop.is_closed():
            with contextlib.suppress(Exception):  # closing is best effort
                await session.close()


class _Watchdog:
    """Times one request against the server's silence (see :class:`_Direct`).

    One timer per request, not per read: ``tick()`` (a byte came) only notes the
    time, for this request's session; the timer, when due, compares that time
    with the request's start and either sleeps on or cancels the request, which
    then fails with ``asyncio.TimeoutError``.
    """

    def __init__(self, direct: _Direct) -> None:
        self._direct = direct
        self._timeout = direct._timeout  # noqa: SLF001 - its owner's setting
        self._fired = False

    def __enter__(self) -> _Watchdog:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._start = self._loop.time()
        self._handle = self._loop.call_at(self._start + self._timeout, self._check)
        return self

    def tick(self) -> None:
        self._direct.last_progress = self._loop.time()

    def _check(self) -> None:
        deadline = max(self._start, self._direct.last_progress) + self._timeout
        if self._loop.time() >= deadline:
            self._fired = True
            if self._task is not None:
                self._task.cancel()
        else:
            self._handle = self._loop.call_at(deadline, self._check)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            if self._task is not None and hasattr(self._task, "uncancel"):
                self._task.uncancel()
            raise asyncio.TimeoutError from None
