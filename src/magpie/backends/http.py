"""The HTTP layer the server backends share: no wire format, only transport.

- :class:`AioSession` and :class:`Watchdog`: POSTs of JSON over one
  ``aiohttp.ClientSession`` per backend, timed against the server's silence.
- :class:`LineSplitter`: the lines of a body read in blocks of any size (NDJSON).
- :func:`sse_fields`: the ``field: value`` lines of a Server-Sent Events body.
- :func:`transport_failure`: what a client's exception means (the server is
  unreachable, it timed out, the connection failed), for aiohttp and httpx.
- :func:`retryable_status` and :func:`error_message`: an HTTP error's status
  and body; :func:`context_overflow`: whether it is a prompt the server
  refused as too long for its context, with the server's counts.

Ollama's backend streams generation over :class:`AioSession` and asks
everything else through the official ``ollama`` client (httpx); the
OpenAI-compatible backend uses ``httpx.AsyncClient``.  The two clients stay:
see :mod:`magpie.backends.ollama` and :mod:`magpie.backends.openai` for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import aiohttp

#: What went wrong below HTTP: nothing answers (refused, DNS, TLS, proxy), the
#: server fell silent, or the connection broke (reset, torn body).
TransportFailure = Literal["unreachable", "timeout", "connection"]


def transport_failure(exc: BaseException, *, watchdog: bool = False) -> TransportFailure | None:
    """The failure ``exc`` stands for, or None when it is not a transport error.

    aiohttp's errors first: some of them are also builtin ConnectionErrors (a
    reset mid-stream is not an unreachable server).  They are looked for only
    where aiohttp was imported (no aiohttp module, no aiohttp error), and so is
    ``asyncio.TimeoutError``, which counts as a timeout only for a request timed
    by a :class:`Watchdog` (``watchdog=True``).
    """
    aio = sys.modules.get("aiohttp")
    if aio is not None:
        if isinstance(exc, aio.ClientConnectorError):  # refused, DNS, TLS, proxy
            return "unreachable"
        if isinstance(exc, aio.ServerTimeoutError) or (
            watchdog and isinstance(exc, asyncio.TimeoutError)
        ):
            return "timeout"
        if isinstance(exc, aio.ClientError):  # disconnected, payload, reset
            return "connection"
    hx = sys.modules.get("httpx")
    if hx is not None:
        if isinstance(exc, hx.ConnectError):
            return "unreachable"
        if isinstance(exc, hx.TimeoutException):
            return "timeout"
        if isinstance(exc, hx.TransportError):
            return "connection"
    return None


def retryable_status(status: int, also: frozenset[int] = frozenset()) -> bool:
    """Whether an HTTP error status is worth a retry: 5xx, and the ``also`` ones
    (each server's own: 429 rate limit, 408 request timeout, 499 closed)."""
    return status >= 500 or status in also


def error_message(body: bytes) -> str:
    """The message of an error body, whatever shape the server gives it.

    ``{"error": {"message": ...}}`` (OpenAI, llama.cpp, recent vLLM),
    ``{"object": "error", "message": ...}`` (older vLLM), ``{"error": "..."}``
    (vLLM's API-key check, Ollama), ``{"detail": ...}`` (FastAPI) or plain text.
    """
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg:
                return str(msg)
        elif err:
            return str(err)
        if "detail" in data:
            return str(data["detail"])
    return text[:300]


@dataclass(frozen=True)
class Overflow:
    """What a server said when it refused a prompt too long for its context:
    its counts where it gave them, and its own words."""

    prompt_tokens: int | None
    context: int | None
    said: str

    def counts(self) -> str:
        """``"2001 tokens, context 512"``, as far as the server counted."""
        parts = []
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens} tokens")
        if self.context is not None:
            parts.append(f"context {self.context}")
        return ", ".join(parts) or "no counts given"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


#: A prompt too long for the context, in each server's words, and where the
#: prompt's token count (``p``) and the context (``c``) are in them.
_OVERFLOW_TEXTS = (
    # llama-server (and Ollama 0.33, which passes it on as a string).
    re.compile(r"request \((?P<p>\d+) tokens\) exceeds the available context size \((?P<c>\d+)"),
    # Ollama 0.33 with truncate on and shift off; its /api/embed.
    re.compile(r"prompt is longer than the context length"),
    re.compile(r"input length exceeds the context length"),
    # vLLM (recent): the prompt with the output tokens asked for.
    re.compile(
        r"You passed (?P<p>\d+) input tokens and requested \d+ output tokens\. However, "
        r"the model's context length is only (?P<c>\d+) tokens"
    ),
    re.compile(
        r"input characters and requested \d+ output tokens\. However, the model's "
        r"context length is only (?P<c>\d+) tokens"
    ),
    # vLLM's engine, and its older servers.
    re.compile(r"prompt \(length (?P<p>\d+)\) .*?maximum model length of (?P<c>\d+)"),
    re.compile(
        r"maximum context length is (?P<c>\d+) tokens\. However, you requested \d+ tokens "
        r"\((?P<p>\d+) in the messages"
    ),
    re.compile(r"maximum context length is (?P<c>\d+) tokens.*?has (?P<p>\d+) input tokens"),
    re.compile(r"maximum context length is (?P<c>\d+) tokens"),
    # SGLang.
    re.compile(
        r"input \((?P<p>\d+) tokens\) is longer than the model's context length \((?P<c>\d+)"
    ),
)


def context_overflow(status: int, body: bytes | str) -> Overflow | None:
    """The overflow an HTTP error reports, or None when it is another error.

    Read from llama-server's ``exceed_context_size_error`` (its
    ``n_prompt_tokens`` and ``n_ctx``), also where Ollama nests that body as a
    string in its own ``{"error": "..."}``, and from the texts of Ollama,
    vLLM and SGLang (:data:`_OVERFLOW_TEXTS`).  Only a 400 (or 413) is one: a
    server error that mentions the context is not the prompt's fault.
    """
    if status not in (400, 413):
        return None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    fields: dict[str, Any] = {}
    said = text.strip()
    for _ in range(3):  # {"error": "{\"error\": {...}}"}: unwrap the nesting
        try:
            data = json.loads(said)
        except ValueError:
            break
        if not isinstance(data, dict):
            break
        err = data.get("error", data)
        if isinstance(err, dict):
            fields.update(err)
            said = str(err.get("message") or err.get("detail") or said)
            break
        if not isinstance(err, str):
            break
        said = err.strip()
    prompt, context = _int(fields.get("n_prompt_tokens")), _int(fields.get("n_ctx"))
    if fields.get("type") == "exceed_context_size_error":
        return Overflow(prompt, context, said[:300])
    for pattern in _OVERFLOW_TEXTS:
        match = pattern.search(said)
        if match is not None:
            found = match.groupdict()
            return Overflow(
                prompt if found.get("p") is None else int(found["p"]),
                context if found.get("c") is None else int(found["c"]),
                said[:300],
            )
    return None


class LineSplitter:
    """The lines of a body that arrives in blocks cut anywhere (NDJSON).

    :meth:`feed` takes one block and returns the lines it completed, blank ones
    left out; the bytes after the last newline wait for the next block, and
    :meth:`rest` is what is left at the end (a last line without its newline).
    Lines are split on ``\\n`` only: a ``\\r`` before it stays, which JSON
    parsers read as whitespace.
    """

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, block: bytes) -> list[bytes]:
        if self._rest:
            block = self._rest + block
        lines = block.split(b"\n")
        self._rest = lines.pop()
        return [line for line in lines if line and not line.isspace()]

    def rest(self) -> bytes | None:
        """The unterminated last line, or None when there is none (or it is blank)."""
        rest, self._rest = self._rest, b""
        return rest if rest and not rest.isspace() else None


async def sse_fields(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """The ``(field, value)`` of each line of a Server-Sent Events body, the
    value stripped; comments (``: keep-alive``) and blank lines are left out.
    ``lines`` are the body's decoded lines (``httpx.Response.aiter_lines``)."""
    async for line in lines:
        field, _, value = line.partition(":")
        if field:
            yield field, value.strip()


class AioSession:
    """POSTs of JSON to one server over an ``aiohttp.ClientSession``.

    The session is made on first use, in the running event loop (a new one if
    the loop changed), with ``headers`` (Accept-Encoding is never sent: a
    compressing proxy would hold lines back), the proxy the environment names
    for the host (HTTP_PROXY, HTTPS_PROXY, NO_PROXY; looked up once, as httpx
    does when a client is made), httpx's certificate store for ``https://``
    (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), keep-alive connections without
    a limit on their number (the server bounds its own parallelism), and
    ``timeout`` for connecting and for each wait for the next bytes, never for
    a whole answer.

    ``timeout`` is the server's silence, not one request's: a request fails
    (:class:`Watchdog`) once no request of this session has received a byte for
    ``timeout`` seconds.  A request queued behind the server's parallel slots
    gets no bytes until a slot frees, however long the requests before it run;
    while they stream, the server is alive and the queued request waits.
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

    @property
    def timeout(self) -> float:
        return self._timeout

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp
        from yarl import URL

        base = URL(self._base)
        ssl: Any = True
        if base.scheme == "https":
            with contextlib.suppress(Exception):  # the official clients' trust store
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
            # Reads are timed by the Watchdog: the server's silence, not a socket's.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=None),
            trace_configs=list(self.trace_configs) or None,
        )

    def watchdog(self) -> Watchdog:
        """A request's timer: see :class:`Watchdog`."""
        return Watchdog(self)

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


class Watchdog:
    """Times one request against the server's silence (see :class:`AioSession`).

    One timer per request, not per read: ``tick()`` (a byte came) only notes the
    time, for this request's session; the timer, when due, compares that time
    with the request's start and either sleeps on or cancels the request, which
    then fails with ``asyncio.TimeoutError``.
    """

    def __init__(self, session: AioSession) -> None:
        self._session = session
        self._timeout = session.timeout
        self._fired = False

    def __enter__(self) -> Watchdog:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._start = self._loop.time()
        self._handle = self._loop.call_at(self._start + self._timeout, self._check)
        return self

    def tick(self) -> None:
        self._session.last_progress = self._loop.time()

    def _check(self) -> None:
        deadline = max(self._start, self._session.last_progress) + self._timeout
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
