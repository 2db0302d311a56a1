"""A lean HTTP/1.1 transport for ``httpx.AsyncClient`` (plain ``http://`` only).

``ollama.AsyncClient(host, transport=LeanTransport())`` keeps the official
client (request building, response models, error types) and replaces what sits
under it: httpcore's connection pool, anyio and h11 cost about 0.4 ms of CPU
per streamed request on a 2-core development machine, this transport well
under 0.1 ms.  :meth:`LeanTransport.exchange` also takes a serialised request
directly (the Ollama backend's NDJSON path, without httpx above it).

It speaks just what an Ollama server needs: keep-alive connections over
asyncio, request bodies sent with ``Content-Length``, response bodies framed by
``Transfer-Encoding: chunked``, ``Content-Length`` or the end of the
connection, and streamed to the caller as they arrive (NDJSON chunks are not
buffered).

Behaviour that callers rely on, as with httpx's own transport:

* errors are httpx's: ``ConnectError`` (refused, unresolvable),
  ``ConnectTimeout``, ``ReadTimeout``/``WriteTimeout`` (the request's
  ``timeout`` extension bounds each wait for the server, not the whole
  response), ``RemoteProtocolError`` (the server closed the connection before
  the response was complete, or sent something that is not HTTP/1.x),
  ``ReadError``/``WriteError`` (the socket failed);
* idle connections are reused, most recently used first, for at most
  ``keepalive_expiry`` seconds; one the server has closed meanwhile is dropped
  before it is used;
* a request is sent again, once, on a new connection only when it provably
  never left: the pooled connection turned out closed while it was being
  written.  A request the server may have received is never repeated here
  (the caller's retry policy decides);
* any URL that is not ``http://`` goes to ``httpx.AsyncHTTPTransport()``
  (TLS, proxies' CONNECT and HTTP/2 are out of scope).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

#: Bytes of a response head (status line and headers) at most.
MAX_HEAD = 64 * 1024
#: Read no more from a socket while this many bytes wait to be consumed.
READ_HIGH_WATER = 1 << 20
#: Seconds an idle connection stays in the pool (httpx's default).
DEFAULT_KEEPALIVE_EXPIRY = 5.0
#: Idle connections kept per origin.
DEFAULT_MAX_IDLE = 256

_TIMED_OUT = object()
_NO_BODY_STATUS = frozenset({204, 304})
_SKIP_REQUEST_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class _Connection(asyncio.Protocol):
    """One TCP connection: a receive buffer and a waiter, no reader task."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, int]) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Any] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[Any] | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- plumbing ------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self.eof or self.transport is None or self.transport.is_closing()

    def reusable(self, now: float, expiry: float) -> bool:
        """Idle, open, nothing unexpected received, and not expired.

        An idle socket that is readable has been closed by the server (or sent
        something unasked): the event loop may not have seen it yet, so the
        socket is polled (one syscall, as httpcore does).
        """
        if self.closed or self.buf or now - self.idle_since > expiry:
            return False
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        return sock is None or not _readable(sock.fileno())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.eof = True

    async def wait_data(self, timeout: float | None, request: httpx.Request | None) -> None:
        """Wait until more bytes (or the end) arrive; ReadTimeout after ``timeout``."""
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        waiter = self.loop.create_future()
        self._waiter = waiter
        timer = self.loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            if await waiter is _TIMED_OUT:
                raise httpx.ReadTimeout(
                    f"no data from the server for {timeout:g} s", request=request
                )
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def send(self, data: bytes, timeout: float | None, request: httpx.Request | None) -> bool:
        """Write ``data``; False when the connection was found closed (nothing sent)."""
        if self.closed:
            return False
        assert self.transport is not None
        self.transport.write(data)
        if self.transport.is_closing() and not self.buf:
            # The socket refused the write at once (EPIPE, ECONNRESET): the
            # server had closed this connection; the request did not leave.
            return False
        while self._write_paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiter = waiter
            timer = self.loop.call_later(timeout, _expire, waiter) if timeout is not None else None
            try:
                if await waiter is _TIMED_OUT:
                    raise httpx.WriteTimeout(
                        f"could not send the request for {timeout:g} s", request=request
                    )
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()
        if self.error is not None and not self.buf:
            raise httpx.WriteError(_describe(self.error), request=request)
        return True

    def read_failure(self, request: httpx.Request | None, what: str) -> httpx.TransportError:
        """The exception for a connection that ended before ``what`` was complete."""
        if self.error is not None:
            return httpx.ReadError(_describe(self.error), request=request)
        return httpx.RemoteProtocolError(what, request=request)

    async def read_head(
        self, timeout: float | None, request: httpx.Request | None
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        """Status, reason, HTTP version and headers of the next final response."""
        while True:
            start = 0
            while True:
                end = self.buf.find(b"\r\n\r\n", start)
                if end >= 0:
                    break
                if len(self.buf) > MAX_HEAD:
                    raise httpx.RemoteProtocolError(
                        "the response head is larger than 64 KiB", request=request
                    )
                if self.eof:
                    raise self.read_failure(
                        request,
                        "Server disconnected without sending a response."
                        if not self.buf
                        else "Server disconnected in the middle of the response head.",
                    )
                start = max(0, len(self.buf) - 3)
                await self.wait_data(timeout, request)
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            status, reason, version, headers = _parse_head(head, request)
            if 100 <= status < 200 and status != 101:
                continue  # an interim response (100 Continue, 103 Early Hints)
            return status, reason, version, headers


def _readable(fd: int) -> bool:
    """Whether ``fd`` has data or an end of file to read, without waiting."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # a socket that cannot be polled is not worth reusing


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def _parse_head(
    head: bytes, request: httpx.Request | None
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(
            f"not an HTTP/1.x response: {lines[0][:80]!r}", request=request
        )
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}", request=request)
        headers.append((name, value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", parts[0], headers


class _Body(httpx.AsyncByteStream):
    """The body of one response; gives the connection back once it is read."""

    def __init__(
        self,
        pool: LeanTransport,
        conn: _Connection,
        request: httpx.Request | None,
        timeout: float | None,
        *,
        chunked: bool,
        length: int | None,
        keep_alive: bool,
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._request = request
        self._timeout = timeout
        self._chunked = chunked
        self._remaining = length  # None with chunked or read-to-close bodies
        self._keep_alive = keep_alive and (chunked or length is not None)
        self._done = length == 0 and not chunked
        if self._done:
            self._finish()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if self._done or conn is None:
            raise StopAsyncIteration
        try:
            if self._chunked:
                data = await self._next_chunks(conn)
            elif self._remaining is not None:
                data = await self._next_fixed(conn)
            else:
                data = await self._next_until_close(conn)
        except BaseException:
            self._drop()
            raise
        if self._done:
            self._finish()
            if not data:
                raise StopAsyncIteration
        return data

    async def _next_chunks(self, conn: _Connection) -> bytes:
        """Every complete chunk in the buffer (waiting for one if there is none)."""
        buf = conn.buf
        while True:
            out: list[bytes] = []
            pos = 0
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = _chunk_size(buf[pos:eol], self._request)
                if size == 0:
                    end = _trailers_end(buf, eol + 2)
                    if end < 0:
                        break
                    pos = end
                    self._done = True
                    break
                if len(buf) < eol + 4 + size:
                    break
                if buf[eol + 2 + size : eol + 4 + size] != b"\r\n":
                    raise httpx.RemoteProtocolError(
                        "malformed chunked body (no CRLF after a chunk)", request=self._request
                    )
                out.append(bytes(buf[eol + 2 : eol + 2 + size]))
                pos = eol + 4 + size
            if pos:
                del buf[:pos]
            if out or self._done:
                return b"".join(out)
            if len(buf) > MAX_HEAD and buf.find(b"\r\n") < 0:
                raise httpx.RemoteProtocolError("malformed chunk size line", request=self._request)
            if conn.eof:
                raise conn.read_failure(
                    self._request,
                    "peer closed connection without sending complete message body: "
                    "incomplete chunked read",
                )
            await conn.wait_data(self._timeout, self._request)

    async def _next_fixed(self, conn: _Connection) -> bytes:
        assert self._remaining is not None
        while not conn.buf:
            if conn.eof:
                raise conn.read_failure(
                    self._request,
                    "peer closed connection without sending complete message body: "
                    f"{self._remaining} bytes missing",
                )
            await conn.wait_data(self._timeout, self._request)
        take = min(self._remaining, len(conn.buf))
        data = bytes(conn.buf[:take])
        del conn.buf[:take]
        self._remaining -= take
        self._done = self._remaining == 0
        return data

    async def _next_until_close(self, conn: _Connection) -> bytes:
        while not conn.buf:
            if conn.eof:
                if conn.error is not None:
                    raise conn.read_failure(self._request, "")
                self._done = True
                return b""
            await conn.wait_data(self._timeout, self._request)
        data = bytes(conn.buf)
        conn.buf.clear()
        return data

    def _finish(self) -> None:
        """The body was read to its end: pool the connection or close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, reuse=self._keep_alive and not conn.buf)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn, reuse=False)

    async def aclose(self) -> None:
        # Closed before its end (an abort, an error): the connection is unusable.
        if not self._done:
            self._drop()


def _chunk_size(line: bytearray, request: httpx.Request | None) -> int:
    text = bytes(line).split(b";", 1)[0].strip()
    try:
        size = int(text, 16)
    except ValueError:
        size = -1
    if size < 0 or not text:
        raise httpx.RemoteProtocolError(
            f"malformed chunk size line {bytes(line[:40])!r}", request=request
        )
    return size


def _trailers_end(buf: bytearray, start: int) -> int:
    """Where the body ends after the last chunk's size line (-1: not yet)."""
    if buf[start : start + 2] == b"\r\n":
        return start + 2
    end = buf.find(b"\r\n\r\n", start)
    return -1 if end < 0 else end + 4


def env_proxy_applies(url: str) -> bool:
    """Whether ``httpx`` would send requests for ``url`` through a proxy from the
    environment (HTTP_PROXY, ALL_PROXY, NO_PROXY...).  httpx ignores those when
    a client is given its own transport, so a caller that wants to keep them
    should use :class:`LeanTransport` only where this is False.  True when it
    cannot tell (another httpx)."""
    try:
        from httpx._utils import URLPattern, get_environment_proxies

        target = httpx.URL(url)
        patterns = sorted(
            ((URLPattern(key), proxy) for key, proxy in get_environment_proxies().items()),
            key=lambda item: item[0],  # httpx's own order: the most specific first
        )
        for pattern, proxy in patterns:
            if pattern.matches(target):
                return proxy is not None
        return False
    except Exception:  # noqa: BLE001 - private httpx helpers: be safe
        return True


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    t = request.extensions.get("timeout") or {}
    return t.get("connect"), t.get("read"), t.get("write")


class RawResponse:
    """A response of :meth:`LeanTransport.exchange`: the head, and the body as a stream."""

    __slots__ = ("body", "headers", "http_version", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: bytes,
        http_version: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _Body,
    ) -> None:
        self.status = status
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        self.body = body

    async def aread(self) -> bytes:
        """The whole body."""
        return b"".join([part async for part in self.body])

    async def aiter_lines(self) -> AsyncIterator[bytes]:
        """The body's lines as they arrive (NDJSON), without their line ends."""
        rest = b""
        async for part in self.body:
            if rest:
                part = rest + part
            lines = part.split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
        if rest:
            yield rest

    async def aclose(self) -> None:
        """Done with the response: its connection is pooled (body read) or closed."""
        await self.body.aclose()


def request_head(method: str, target: str, host: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers of a request, without ``Content-Length`` and
    the blank line: :meth:`LeanTransport.exchange` takes
    ``head + b"Content-Length: N\\r\\n\\r\\n" + body``.  ``Host``,
    ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` in ``headers``
    are left out."""
    lines = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + host.encode("ascii")]
    skip = _SKIP_REQUEST_HEADERS | {b"host"}
    lines += [name + b": " + value for name, value in headers if name.lower() not in skip]
    return b"\r\n".join(lines) + b"\r\n"


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 over asyncio for ``http://`` URLs.

    One instance serves one ``httpx.AsyncClient``; it opens as many connections
    as requests run at once (the server bounds its own parallelism) and keeps up
    to ``max_idle`` idle ones per origin for ``keepalive_expiry`` seconds.
    """

    def __init__(
        self,
        *,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        max_idle: int = DEFAULT_MAX_IDLE,
    ) -> None:
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._active: set[_Connection] = set()
        self._fallback: httpx.AsyncBaseTransport | None = None
        self._closed = False
        #: Connections opened so far (tests and benchmarks read it).
        self.connections_opened = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        connect_timeout, read_timeout, write_timeout = _timeouts(request)
        body = await request.aread()
        raw = await self.exchange(
            (url.host, url.port or 80),
            _serialize(request, body),
            request.method,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            request=request,
        )
        return httpx.Response(
            raw.status,
            headers=raw.headers,
            stream=raw.body,
            extensions={"http_version": raw.http_version, "reason_phrase": raw.reason},
        )

    async def exchange(
        self,
        origin: tuple[str, int],
        data: bytes,
        method: str = "POST",
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        request: httpx.Request | None = None,
    ) -> RawResponse:
        """Send ``data`` (a whole serialised request, see :func:`request_head`)
        to ``origin`` (host, port) and read the response head.

        The body streams from ``RawResponse.body``; read it to its end or call
        ``aclose()``, which gives the connection back to the pool.  ``request``
        only goes into the exceptions.
        """
        if self._closed:
            raise RuntimeError("the transport is closed")
        for attempt in (0, 1):
            conn = self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout, request)
            self._active.add(conn)
            try:
                if not await conn.send(data, write_timeout, request):
                    self._release(conn, reuse=False)
                    if reused and attempt == 0:
                        continue  # a stale pooled connection: the request never left
                    raise conn.read_failure(request, "the connection closed before the request")
                status, reason, version, headers = await conn.read_head(read_timeout, request)
                return self._response(
                    conn, request, method, status, reason, version, headers, read_timeout
                )
            except BaseException:
                self._release(conn, reuse=False)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _response(
        self,
        conn: _Connection,
        request: httpx.Request | None,
        method: str,
        status: int,
        reason: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        read_timeout: float | None,
    ) -> RawResponse:
        chunked = False
        length: int | None = None
        keep_alive = version == b"HTTP/1.1"
        for name, value in headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif lname == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    raise httpx.RemoteProtocolError(
                        f"bad Content-Length {value[:40]!r}", request=request
                    )
            elif lname == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if method == "HEAD" or status in _NO_BODY_STATUS:
            chunked, length = False, 0
        elif chunked:
            length = None
        body = _Body(
            self,
            conn,
            request,
            read_timeout,
            chunked=chunked,
            length=length,
            keep_alive=keep_alive,
        )
        return RawResponse(status, reason, version, headers, body)

    async def _connect(
        self, origin: tuple[str, int], timeout: float | None, request: httpx.Request
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = origin
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop, origin), host, port),
                timeout,
            )
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(
                f"could not connect to {host}:{port} within {timeout:g} s", request=request
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(_describe(exc), request=request) from exc
        self.connections_opened += 1
        return conn

    def _take_idle(self, origin: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.reusable(now, self.keepalive_expiry):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        self._active.discard(conn)
        if not reuse or self._closed or conn.closed:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle = self._idle.setdefault(conn.origin, deque())
        idle.append(conn)
        # Drop expired connections from the bottom and keep at most max_idle.
        while idle and (
            len(idle) > self.max_idle
            or conn.idle_since - idle[0].idle_since > self.keepalive_expiry
        ):
            idle.popleft().close()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._active):
            conn.close()
        self._active.clear()
        if self._fallback is not None:
            with contextlib.suppress(Exception):
                await self._fallback.aclose()


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body, as one buffer."""
    url = request.url
    target = url.raw_path or b"/"
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), target)]
    for name, value in request.headers.raw:
        if name.lower() not in _SKIP_REQUEST_HEADERS:
            lines.append(name + b": " + value)
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines) + body
