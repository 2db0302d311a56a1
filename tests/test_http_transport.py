"""``magpie.backends.http_transport.LeanTransport`` under the real ``ollama``
client, and the Ollama backend's direct NDJSON path over it, against the
Ollama-protocol test server over real HTTP: keep-alive reuse, servers closing
connections, chunked NDJSON streaming, timeouts, refused connections, headers.
A few wire-format corners the test server never produces (Content-Length and
read-to-close bodies, ``Connection: close``, chunk extensions and trailers) use
a raw socket server in this file."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import ollama
import pytest

from conftest import CLOSED_PORT
from magpie.backends.base import Sampling
from magpie.backends.http_transport import LeanTransport
from magpie.backends.ollama import OllamaBackend
from magpie.errors import BackendError, BackendUnavailable
from ollama_server import (
    Delay,
    DropConnection,
    Generation,
    HttpError,
    MidStreamError,
    OllamaTestServer,
    ScriptedEngine,
    build_models,
)

MODEL = "llama3.1:8b"
PROMPT = "<|start_header_id|>user<|end_header_id|>\n\n"
SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_tokens=64)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextmanager
def server(engine: Any = None, **kwargs: Any) -> Iterator[OllamaTestServer]:
    with OllamaTestServer(build_models(["llama3.1"], engine or ScriptedEngine()), **kwargs) as srv:
        yield srv


def client(url: str, timeout: float = 10.0) -> tuple[ollama.AsyncClient, LeanTransport]:
    transport = LeanTransport()
    return ollama.AsyncClient(host=url, timeout=timeout, transport=transport), transport


async def chat_text(c: ollama.AsyncClient, content: str = "hi") -> str:
    parts = [
        p async for p in await c.chat(MODEL, [{"role": "user", "content": content}], stream=True)
    ]
    assert parts[-1].done
    return "".join(p.message.content or "" for p in parts)


class PacedEngine(ScriptedEngine):
    """Scripted text, one word every ``pace`` seconds (a model decoding);
    ``stall_after`` words, then a silence of ``stall`` seconds."""

    def __init__(self, pace: float = 0.0, stall_after: int | None = None, stall: float = 0.0):
        super().__init__()
        self.pace, self.stall_after, self.stall = pace, stall_after, stall

    def _emit(self, gen: Generation, text: str, options: Mapping[str, Any]) -> Iterator[str]:
        for i, word in enumerate(super()._emit(gen, text, options)):
            if i:
                time.sleep(self.pace)
            if self.stall_after is not None and i == self.stall_after:
                time.sleep(self.stall)
            yield word


# --------------------------------------------------------------------------- keep-alive


def test_keep_alive_reuses_one_connection() -> None:
    async def main() -> int:
        c, transport = client(srv.url)
        for i in range(5):
            assert (await chat_text(c, f"q{i}")).startswith("Answer ")
            r = await c.generate(MODEL, PROMPT, raw=True)  # Content-Length body
            assert r.response
        assert (await c.list()).models
        await c.close()
        return transport.connections_opened

    with server() as srv:
        assert run(main()) == 1
        assert len(srv.requests_to("/api/chat")) == 5


def test_concurrent_requests_open_connections_then_reuse_them() -> None:
    async def main() -> tuple[int, int]:
        c, transport = client(srv.url)
        texts = await asyncio.gather(*(chat_text(c, f"q{i}") for i in range(12)))
        assert all(t.startswith("Answer ") for t in texts)
        first = transport.connections_opened
        await asyncio.gather(*(chat_text(c, f"r{i}") for i in range(12)))
        await c.close()
        return first, transport.connections_opened

    with server(ScriptedEngine(latency=0.05)) as srv:
        first, total = run(main())
    assert 1 <= first <= 12 and total == first  # the second wave reused the pool


def test_expired_idle_connections_are_not_reused() -> None:
    async def main() -> int:
        transport = LeanTransport(keepalive_expiry=0.1)
        c = ollama.AsyncClient(host=srv.url, timeout=10, transport=transport)
        await chat_text(c)
        await asyncio.sleep(0.3)
        await chat_text(c)
        await c.close()
        return transport.connections_opened

    with server() as srv:
        assert run(main()) == 2


# --------------------------------------------------------------------------- servers closing


def test_server_restart_closes_pooled_connections_next_request_reconnects() -> None:
    async def main() -> int:
        c, transport = client(srv.url)
        await chat_text(c)
        srv.stop()  # shuts every open connection down, then refuses
        with pytest.raises(httpx.ConnectError):
            await chat_text(c)
        srv.start()  # the same port
        assert (await chat_text(c)).startswith("Answer ")
        await c.close()
        return transport.connections_opened

    with server() as srv:
        assert run(main()) == 2


def test_dropped_connection_is_an_error_not_a_silent_retry() -> None:
    """The server read the request, then closed: the request may have run, so
    the transport does not send it again (the caller's retry policy decides)."""

    async def main() -> None:
        c, _ = client(srv.url)
        await chat_text(c)  # a pooled connection
        srv.inject(DropConnection(), path="/api/chat")
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await chat_text(c)
        assert (await chat_text(c)).startswith("Answer ")
        await c.close()

    with server() as srv:
        run(main())
        assert len(srv.requests_to("/api/chat")) == 3  # no hidden retry


def test_http_errors_and_mid_stream_errors_keep_their_types() -> None:
    async def main() -> None:
        c, transport = client(srv.url)
        srv.inject(HttpError(503, "busy"), path="/api/chat")
        with pytest.raises(ollama.ResponseError) as info:
            await chat_text(c)
        assert info.value.status_code == 503 and info.value.error == "busy"
        assert (await chat_text(c)).startswith("Answer ")
        assert transport.connections_opened == 1  # an error answer keeps the connection
        srv.inject(MidStreamError("runner crashed"), path="/api/chat")
        with pytest.raises(ollama.ResponseError) as info:
            await chat_text(c)
        assert info.value.error == "runner crashed" and info.value.status_code == -1
        # (The client stops reading at the error line: unless the body's end came
        # with it, that connection is closed, not pooled.)
        assert (await chat_text(c)).startswith("Answer ")
        await c.close()

    with server() as srv:
        run(main())


# --------------------------------------------------------------------------- streaming


def test_chunked_ndjson_lines_arrive_as_they_are_written() -> None:
    async def main() -> list[float]:
        c, _ = client(srv.url)
        t0 = time.perf_counter()
        seen = []
        async for _ in await c.chat(MODEL, [{"role": "user", "content": "hi"}], stream=True):
            seen.append(time.perf_counter() - t0)
        await c.close()
        return seen

    with server(PacedEngine(pace=0.02)) as srv:
        seen = run(main())
    assert len(seen) > 10
    # Not buffered: the first line came long before the last (0.02 s per word).
    assert seen[-1] - seen[0] > 0.15


def test_direct_path_sends_what_the_official_client_sends(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OLLAMA_API_KEY", "sekret")

    async def both() -> list[Any]:
        out = []
        for direct in (True, False):
            b = OllamaBackend(MODEL, srv.url, timeout=10, keep_alive="5m", direct_stream=direct)
            assert (b._direct is not None) is direct
            inst = await b.complete(PROMPT, sampling=SAMPLING, stop=["<|eot_id|>"], seed=3)
            answer = await b.chat(
                [{"role": "user", "content": inst.text}],
                sampling=SAMPLING,
                seed=4,
                json_schema={"type": "object", "properties": {"a": {"type": "string"}}},
            )
            await b.aclose()
            out.append((inst, answer))
        return out

    with server() as srv:
        (d_inst, d_ans), (o_inst, o_ans) = run(both())
        reqs = srv.requests
    assert d_inst == o_inst and d_ans == o_ans
    assert d_inst.finish_reason == "stop" and d_inst.completion_tokens
    direct, official = reqs[:2], reqs[2:]
    for d, o in zip(direct, official, strict=True):
        assert (d.method, d.path, d.body) == (o.method, o.path, o.body)
        dh = {k.lower(): v for k, v in d.headers.items()}
        oh = {k.lower(): v for k, v in o.headers.items()}
        assert dh["authorization"] == oh["authorization"] == "Bearer sekret"
        assert dh["user-agent"] == oh["user-agent"] and dh["user-agent"].startswith(
            "ollama-python/"
        )
        assert dh["content-type"] == "application/json" and dh["accept"] == "application/json"
        assert dh["content-length"] == str(len(d.raw))
        oh.pop("accept-encoding")  # the direct path asks for identity bodies
        assert {k for k in dh if k != "content-length"} == {k for k in oh if k != "content-length"}


def test_abort_closes_the_stream_and_the_connection() -> None:
    async def main() -> tuple[str, int]:
        b = OllamaBackend(MODEL, srv.url, timeout=10)
        seen: list[str] = []

        def abort(text: str) -> bool:
            seen.append(text)
            return len(seen) >= 2

        c = await b.chat([{"role": "user", "content": "hi"}], sampling=SAMPLING, abort=abort)
        assert c.finish_reason == "abort" and c.completion_tokens == 2
        again = await b.chat([{"role": "user", "content": "hi"}], sampling=SAMPLING)
        assert again.finish_reason == "stop"
        opened = b._transport.connections_opened  # type: ignore[union-attr]
        await b.aclose()
        return again.text, opened

    with server(PacedEngine(pace=0.01)) as srv:
        text, opened = run(main())
    assert text.startswith("Answer ")
    assert opened == 2  # the aborted stream's connection was not pooled


# --------------------------------------------------------------------------- timeouts


def test_no_first_byte_within_the_timeout_is_a_read_timeout() -> None:
    async def main() -> None:
        c, _ = client(srv.url, timeout=0.3)
        srv.inject(Delay(2.0), path="/api/chat")
        t0 = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            await chat_text(c)
        assert time.perf_counter() - t0 < 1.5
        assert (await chat_text(c)).startswith("Answer ")
        await c.close()

    with server() as srv:
        run(main())


def test_timeout_bounds_the_silence_between_chunks_not_the_whole_answer() -> None:
    async def main() -> None:
        b = OllamaBackend(MODEL, srv.url, timeout=0.5)
        # 40-odd words 0.05 s apart: 2 s in all, never 0.5 s of silence.
        c = await b.chat([{"role": "user", "content": "hi"}], sampling=SAMPLING)
        assert c.finish_reason == "stop"
        engine.stall_after, engine.stall = 3, 1.5  # then a stall mid-stream
        with pytest.raises(BackendError) as info:
            await b.chat([{"role": "user", "content": "hi"}], sampling=SAMPLING)
        assert info.value.cause == "timeout" and info.value.retryable
        engine.stall_after = None
        assert (await b.chat([{"role": "user", "content": "x"}], sampling=SAMPLING)).text
        await b.aclose()

    engine = PacedEngine(pace=0.05)
    with server(engine) as srv:
        run(main())


# --------------------------------------------------------------------------- refused


def test_refused_connection_is_a_connect_error() -> None:
    url = f"http://127.0.0.1:{CLOSED_PORT}"

    async def main() -> None:
        c, _ = client(url)
        with pytest.raises(httpx.ConnectError):
            await chat_text(c)
        with pytest.raises(ConnectionError):  # the official client's own mapping
            await c.list()
        b = OllamaBackend(MODEL, url, timeout=5)
        with pytest.raises(BackendUnavailable):
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        with pytest.raises(BackendUnavailable):
            await b.version()
        await b.aclose()
        await c.close()

    run(main())


def test_https_hosts_keep_the_default_transport() -> None:
    b = OllamaBackend(MODEL, "https://ollama.example.com:11434", timeout=5)
    assert b._transport is None and b._direct is None
    run(b.aclose())


def test_a_proxy_from_the_environment_keeps_the_official_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    b = OllamaBackend(MODEL, "http://ollama.example.com:11434", timeout=5)
    # httpx honours the proxy only with its own transport: keep it, and the official path.
    assert b._transport is None and b._direct is None
    run(b.aclose())
    monkeypatch.setenv("NO_PROXY", "ollama.example.com")
    b = OllamaBackend(MODEL, "http://ollama.example.com:11434", timeout=5)
    assert b._transport is not None and b._direct is not None
    run(b.aclose())


# --------------------------------------------------------------------------- raw corners


@contextmanager
def raw_server(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-thread-per-connection TCP server running ``handler(conn)``."""
    lsock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        lsock.close()


def read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One request (head + Content-Length body) from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < end + length:
        buf += conn.recv(65536)
    del buf[: end + length]
    return head


@pytest.mark.parametrize(
    ("reply", "reusable"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true}', True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;ext=1\r\n{"ok"\r\n7\r\n: true}\r\n0\r\nX-Trailer: 1\r\n\r\n',
            True,
        ),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{"ok": true}', False),
        (b'HTTP/1.0 200 OK\r\n\r\n{"ok": true}', False),  # read to the end of the connection
        (
            b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true}',
            True,
        ),
    ],
    ids=[
        "content-length",
        "chunked-ext-trailers",
        "connection-close",
        "http10-to-close",
        "interim-100",
    ],
)
def test_response_framings(reply: bytes, reusable: bool) -> None:
    def handler(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while read_request(conn, buf) is not None:
                conn.sendall(reply)
                if not reusable:
                    conn.shutdown(socket.SHUT_WR)
                    return

    async def main() -> int:
        transport = LeanTransport()
        async with httpx.AsyncClient(transport=transport, base_url=url, timeout=5) as c:
            for _ in range(3):
                r = await c.post("/x", json={"q": 1})
                assert r.status_code == 200 and r.json() == {"ok": True}
        return transport.connections_opened

    with raw_server(handler) as url:
        assert run(main()) == (1 if reusable else 3)


def test_idle_connection_closed_by_the_server_is_replaced_quietly() -> None:
    """A server that closes each keep-alive connection shortly after its answer
    (an idle timeout): the next request opens a new one, no error."""

    def handler(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            if read_request(conn, buf) is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.05)

    async def main() -> int:
        transport = LeanTransport()
        async with httpx.AsyncClient(transport=transport, base_url=url, timeout=5) as c:
            for _ in range(3):
                assert (await c.get("/")).text == "ok"
                await asyncio.sleep(0.2)
        return transport.connections_opened

    with raw_server(handler) as url:
        assert run(main()) == 3


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", httpx.RemoteProtocolError),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
            httpx.RemoteProtocolError,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", httpx.RemoteProtocolError),
        (b"", httpx.RemoteProtocolError),
    ],
    ids=["short-content-length", "truncated-chunk", "bad-chunk-size", "not-http", "nothing"],
)
def test_broken_responses_raise_transport_errors(reply: bytes, error: type[Exception]) -> None:
    def handler(conn: socket.socket) -> None:
        with conn:
            if read_request(conn, bytearray()) is not None:
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.2)

    async def main() -> None:
        async with httpx.AsyncClient(transport=LeanTransport(), base_url=url, timeout=5) as c:
            with pytest.raises(error):
                r = await c.post("/api/chat", json={})
                await r.aread()

    with raw_server(handler) as url:
        run(main())


def test_direct_path_maps_a_line_that_is_not_json_to_a_retryable_error() -> None:
    def handler(conn: socket.socket) -> None:
        with conn:
            if read_request(conn, bytearray()) is not None:
                body = b'{"response":"a","done":false}\n<html>\n'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        b = OllamaBackend(MODEL, url, timeout=5)
        with pytest.raises(BackendError) as info:
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        assert info.value.cause == "stream_error" and info.value.retryable
        await b.aclose()

    with raw_server(handler) as url:
        run(main())


def test_request_body_and_headers_on_the_wire() -> None:
    seen: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            head = read_request(conn, buf)
            if head is not None:
                seen.append(head)
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        async with httpx.AsyncClient(transport=LeanTransport(), base_url=url, timeout=5) as c:
            r = await c.post("/p?q=1", content=b"abc", headers={"X-A": "1"})
            assert r.status_code == 204 and r.content == b""

    with raw_server(handler) as url:
        run(main())
    head = seen[0].decode()
    assert head.startswith("POST /p?q=1 HTTP/1.1\r\n")
    assert "\r\nContent-Length: 3\r\n" in head and "\r\nX-A: 1\r\n" in head
    assert f"\r\nHost: {url.removeprefix('http://')}\r\n".lower() in head.lower()
