"""The Ollama backend's direct path: /api/generate and /api/chat streamed as
NDJSON over aiohttp, against the Ollama-protocol test server over real HTTP
(keep-alive reuse, servers closing connections, streaming, timeouts, refused
connections, TLS, proxies, the same requests as the official client) and, for
wire-format corners the test server never produces (Content-Length and
read-to-close bodies, ``Connection: close``, chunk extensions and trailers,
broken responses), a raw socket server in this file."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import ollama_server
import pytest
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

from conftest import CLOSED_PORT
from magpie.backends.base import Sampling
from magpie.backends.ollama import OllamaBackend
from magpie.errors import BackendError, BackendUnavailable, ModelNotFound

MODEL = "llama3.1:8b"
PROMPT = "<|start_header_id|>user<|end_header_id|>\n\n"
SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_tokens=64)
HI = [{"role": "user", "content": "hi"}]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextmanager
def server(engine: Any = None, **kwargs: Any) -> Iterator[OllamaTestServer]:
    with OllamaTestServer(build_models(["llama3.1"], engine or ScriptedEngine()), **kwargs) as srv:
        yield srv


class Backend(OllamaBackend):
    """An OllamaBackend that counts the connections its direct path opens."""

    def __init__(self, host: str, timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(MODEL, host, timeout=timeout, **kwargs)
        self.opened = 0
        trace = aiohttp.TraceConfig()

        async def on_create(*_: Any) -> None:
            self.opened += 1

        trace.on_connection_create_end.append(on_create)
        assert self._direct is not None
        self._direct.trace_configs.append(trace)

    async def ask(self, content: str = "hi") -> str:
        c = await self.chat([{"role": "user", "content": content}], sampling=SAMPLING)
        assert c.finish_reason == "stop"
        return c.text


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
        b = Backend(srv.url)
        for i in range(5):
            inst = await b.complete(PROMPT, sampling=SAMPLING, stop=[], seed=i)
            assert inst.text and inst.finish_reason == "stop"
            assert (await b.ask(f"q{i}")).startswith("Answer ")
        await b.aclose()
        return b.opened

    with server() as srv:
        assert run(main()) == 1
        assert len(srv.requests_to("/api/chat")) == len(srv.requests_to("/api/generate")) == 5


def test_concurrent_requests_open_connections_then_reuse_them() -> None:
    async def main() -> tuple[int, int]:
        b = Backend(srv.url)
        texts = await asyncio.gather(*(b.ask(f"q{i}") for i in range(12)))
        assert all(t.startswith("Answer ") for t in texts)
        first = b.opened
        await asyncio.gather(*(b.ask(f"r{i}") for i in range(12)))
        await b.aclose()
        return first, b.opened

    with server(ScriptedEngine(latency=0.3)) as srv:
        first, total = run(main())
    # No limit below the concurrency: all 12 ran at once; the second wave reused them.
    assert first == 12 and total == first
    assert srv.peak_concurrency == 12


def test_expired_idle_connections_are_not_reused() -> None:
    async def main() -> int:
        b = Backend(srv.url)
        assert b._direct is not None
        b._direct.KEEPALIVE_EXPIRY = 0.1
        await b.ask()
        await asyncio.sleep(0.3)
        await b.ask()
        await b.aclose()
        return b.opened

    with server() as srv:
        assert run(main()) == 2


def test_a_new_event_loop_gets_a_new_session() -> None:
    with server() as srv:
        b = Backend(srv.url)
        assert run(b.ask()).startswith("Answer ")  # a first loop, closed at its end
        assert run(b.ask()).startswith("Answer ")  # a second one
        run(b.aclose())
        assert b.opened == 2


# --------------------------------------------------------------------------- servers closing


def test_server_restart_closes_pooled_connections_next_request_reconnects() -> None:
    async def main() -> int:
        b = Backend(srv.url)
        await b.ask()
        srv.stop()  # shuts every open connection down, then refuses
        await asyncio.sleep(0.1)  # the event loop sees the pooled connection close
        with pytest.raises(BackendUnavailable):
            await b.ask()
        with pytest.raises(BackendUnavailable):
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        srv.start()  # the same port
        assert (await b.ask()).startswith("Answer ")
        await b.aclose()
        return b.opened

    with server() as srv:
        assert run(main()) == 2


def test_dropped_connection_is_a_retryable_error_not_a_silent_retry() -> None:
    """The server read the request, then closed: the request may have run, so
    it is not sent again here (the caller's retry policy decides)."""

    async def main() -> None:
        b = Backend(srv.url)
        await b.ask()  # a pooled connection
        srv.inject(DropConnection(), path="/api/chat")
        with pytest.raises(BackendError) as info:
            await b.ask()
        assert info.value.cause == "connection" and info.value.retryable
        assert "ServerDisconnectedError" in str(info.value)
        assert (await b.ask()).startswith("Answer ")
        await b.aclose()

    with server() as srv:
        run(main())
        assert len(srv.requests_to("/api/chat")) == 3  # no hidden retry


def test_http_errors_and_mid_stream_errors_map_as_the_official_clients() -> None:
    async def main() -> None:
        b = Backend(srv.url)
        for status, retryable in ((503, True), (429, True), (500, True), (400, False)):
            srv.inject(HttpError(status, "busy"), path="/api/chat")
            with pytest.raises(BackendError) as info:
                await b.ask()
            err = info.value
            assert (err.cause, err.retryable) == (f"http_{status}", retryable)
            assert str(err) == f"Ollama answered {status}: busy"  # the JSON body's error
            assert type(err) is BackendError
        assert (await b.ask()).startswith("Answer ")
        assert b.opened == 1  # an error answer, read to its end, keeps the connection
        srv.inject(MidStreamError("runner crashed"), path="/api/chat")
        with pytest.raises(BackendError) as info:
            await b.ask()
        assert info.value.cause == "stream_error" and info.value.retryable
        assert "runner crashed" in str(info.value)
        assert (await b.ask()).startswith("Answer ")
        await b.aclose()

    with server() as srv:
        run(main())


def test_unknown_model_is_model_not_found() -> None:
    async def main() -> None:
        b = OllamaBackend("nope:1b", srv.url, timeout=5)
        with pytest.raises(ModelNotFound, match="ollama pull nope:1b"):
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        with pytest.raises(ModelNotFound):
            await b.chat(HI, sampling=SAMPLING)
        await b.aclose()

    with server() as srv:
        run(main())


# --------------------------------------------------------------------------- streaming


def test_ndjson_lines_arrive_as_they_are_written() -> None:
    async def main() -> list[float]:
        b = Backend(srv.url)
        t0 = time.perf_counter()
        seen: list[float] = []

        def abort(text: str) -> bool:
            seen.append(time.perf_counter() - t0)
            return False

        c = await b.chat(HI, sampling=SAMPLING, abort=abort)
        assert c.finish_reason == "stop"
        await b.aclose()
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
                [{"role": "user", "content": inst.text + " é ✓"}],
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
        for r in (d, o):  # compact UTF-8 JSON, as httpx encodes json= (key order aside)
            assert r.raw == json.dumps(r.body, ensure_ascii=False, separators=(",", ":")).encode()
        dh = {k.lower(): v for k, v in d.headers.items()}
        oh = {k.lower(): v for k, v in o.headers.items()}
        assert dh["authorization"] == oh["authorization"] == "Bearer sekret"
        assert dh["user-agent"] == oh["user-agent"] and dh["user-agent"].startswith(
            "ollama-python/"
        )
        assert dh["content-type"] == "application/json" and dh["accept"] == "application/json"
        assert dh["content-length"] == str(len(d.raw))
        assert "accept-encoding" not in dh  # identity bodies: nothing held back to compress
        # httpx also sends Accept-Encoding and Connection: keep-alive (HTTP/1.1's default).
        assert set(dh) == set(oh) - {"accept-encoding", "connection"}


def test_abort_closes_the_stream_and_the_connection() -> None:
    async def main() -> str:
        b = Backend(srv.url)
        seen: list[str] = []

        def abort(text: str) -> bool:
            seen.append(text)
            return len(seen) >= 2

        c = await b.chat(HI, sampling=SAMPLING, abort=abort)
        assert c.finish_reason == "abort" and c.completion_tokens == 2
        again = await b.chat(HI, sampling=SAMPLING)
        assert again.finish_reason == "stop"
        await b.aclose()
        assert b.opened == 2  # the aborted stream's connection was not pooled
        return again.text

    with server(PacedEngine(pace=0.01)) as srv:
        assert run(main()).startswith("Answer ")


# --------------------------------------------------------------------------- timeouts


def test_no_first_byte_within_the_timeout_is_a_retryable_timeout() -> None:
    async def main() -> None:
        b = Backend(srv.url, timeout=0.3)
        srv.inject(Delay(2.0), path="/api/chat")
        t0 = time.perf_counter()
        with pytest.raises(BackendError) as info:
            await b.ask()
        assert info.value.cause == "timeout" and info.value.retryable
        assert time.perf_counter() - t0 < 1.5
        assert (await b.ask()).startswith("Answer ")
        await b.aclose()

    with server() as srv:
        run(main())


@pytest.mark.slow
def test_timeout_bounds_the_silence_between_chunks_not_the_whole_answer() -> None:
    async def main() -> None:
        b = Backend(srv.url, timeout=0.5)
        # 40-odd words 0.05 s apart: 2 s in all, never 0.5 s of silence.
        c = await b.chat(HI, sampling=SAMPLING)
        assert c.finish_reason == "stop"
        engine.stall_after, engine.stall = 3, 1.5  # then a stall mid-stream
        t0 = time.perf_counter()
        with pytest.raises(BackendError) as info:
            await b.chat(HI, sampling=SAMPLING)
        assert info.value.cause == "timeout" and info.value.retryable
        assert time.perf_counter() - t0 < 1.4
        engine.stall_after = None
        assert (await b.chat([{"role": "user", "content": "x"}], sampling=SAMPLING)).text
        await b.aclose()

    engine = PacedEngine(pace=0.05)
    with server(engine) as srv:
        run(main())


# --------------------------------------------------------------------------- unreachable


def test_refused_connection_is_backend_unavailable() -> None:
    async def main(url: str) -> None:
        b = OllamaBackend(MODEL, url, timeout=5)
        with pytest.raises(BackendUnavailable, match="not reachable"):
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        with pytest.raises(BackendUnavailable):
            await b.chat(HI, sampling=SAMPLING)
        with pytest.raises(BackendUnavailable):  # the official client's path
            await b.version()
        await b.aclose()

    run(main(f"http://127.0.0.1:{CLOSED_PORT}"))
    run(main(f"https://127.0.0.1:{CLOSED_PORT}"))


def test_unresolvable_host_is_backend_unavailable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "ollama.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def main() -> None:
        b = OllamaBackend(MODEL, "http://ollama.invalid:11434", timeout=5)
        with pytest.raises(BackendUnavailable):
            await b.chat(HI, sampling=SAMPLING)
        await b.aclose()

    run(main())


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-addext", "basicConstraints=critical,CA:TRUE"]
        + ["-addext", "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment"],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server(cert: Path, key: Path) -> OllamaTestServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    class TLSHTTPServer(ollama_server._HTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            return context.wrap_socket(sock, server_side=True), addr

    class TLSServer(OllamaTestServer):
        _server_class = TLSHTTPServer

        @property
        def url(self) -> str:
            return f"https://{self.host}:{self.port}"

    return TLSServer(build_models(["llama3.1"], ScriptedEngine()))


def test_https_with_the_official_clients_trust_store(monkeypatch, tls_cert) -> None:  # type: ignore[no-untyped-def]
    """https:// goes over aiohttp's TLS, trusting what httpx trusts (certifi, or
    SSL_CERT_FILE): an unknown certificate is refused as the official client
    refuses it, BackendUnavailable."""
    cert, key = tls_cert

    async def main() -> None:
        b = Backend(srv.url)
        with pytest.raises(BackendUnavailable):  # a self-signed certificate
            await b.ask()
        await b.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        for direct in (True, False):
            b = OllamaBackend(MODEL, srv.url, timeout=10, direct_stream=direct)
            c = await b.chat(HI, sampling=SAMPLING)
            assert c.finish_reason == "stop" and c.text.startswith("Answer ")
            await b.aclose()
        monkeypatch.delenv("SSL_CERT_FILE")

    with tls_server(cert, key) as srv:
        run(main())
        assert len(srv.requests_to("/api/chat")) == 2


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


NDJSON = (
    b'{"response":"o","done":false}\n{"response":"k","done":false}\n'
    b'{"response":"","done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2}\n'
)

ODD_LINES = NDJSON.replace(b"\n", b"\r\n", 1).replace(b"\n", b"\n \n", 1)[:-1]


def chunked(*parts: bytes, ext: bytes = b"", trailers: bytes = b"") -> bytes:
    return (
        b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts)
        + b"0\r\n"
        + trailers
        + b"\r\n"
    )


@pytest.mark.parametrize(
    ("reply", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(NDJSON) + NDJSON, True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(
                NDJSON[:20], NDJSON[20:70], NDJSON[70:], ext=b";ext=1", trailers=b"X-T: 1\r\n"
            ),
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(NDJSON)
            + NDJSON,
            False,
        ),
        (b"HTTP/1.0 200 OK\r\n\r\n" + NDJSON, False),  # read to the end of the connection
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
            % len(NDJSON)
            + NDJSON,
            True,
        ),
        (  # CRLF line ends, a blank line, the last line without its newline
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(ODD_LINES) + ODD_LINES,
            True,
        ),
    ],
    ids=[
        "content-length",
        "chunked-ext-trailers",
        "connection-close",
        "http10-to-close",
        "interim-100",
        "line-ends",
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
        b = Backend(url, timeout=5)
        for _ in range(3):
            c = await b.complete(PROMPT, sampling=SAMPLING, stop=[])
            assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == (
                "ok",
                "stop",
                3,
                2,
            )
        await b.aclose()
        return b.opened

    with raw_server(handler) as url:
        assert run(main()) == (1 if reusable else 3)


def test_idle_connection_closed_by_the_server_is_replaced_quietly() -> None:
    """A server that closes each keep-alive connection shortly after its answer
    (an idle timeout): the next request opens a new one, no error."""

    def handler(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            if read_request(conn, buf) is not None:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(NDJSON) + NDJSON
                )
                time.sleep(0.05)

    async def main() -> int:
        b = Backend(url, timeout=5)
        for _ in range(3):
            assert (await b.complete(PROMPT, sampling=SAMPLING, stop=[])).text == "ok"
            await asyncio.sleep(0.2)
        await b.aclose()
        return b.opened

    with raw_server(handler) as url:
        assert run(main()) == 3


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + NDJSON[:40],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(NDJSON)[:50],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"",
    ],
    ids=[
        "short-content-length",
        "truncated-chunk",
        "bad-chunk-size",
        "not-http",
        "nothing",
    ],
)
def test_broken_responses_are_retryable_connection_errors(reply: bytes) -> None:
    def handler(conn: socket.socket) -> None:
        with conn:
            if read_request(conn, bytearray()) is not None:
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.2)

    async def main() -> None:
        b = OllamaBackend(MODEL, url, timeout=5)
        with pytest.raises(BackendError) as info:
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        assert info.value.cause == "connection" and info.value.retryable
        assert type(info.value) is BackendError
        await b.aclose()

    with raw_server(handler) as url:
        run(main())


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_clean_end_without_done_is_the_servers_repeat_guard(framing: str) -> None:
    """Real Ollama (llm/llama_server.go) ends a generation after more than 30
    equal tokens with HTTP 200, no done line and no error line: the text so far
    with finish reason "repeat", not a connection failure to retry."""
    body = b'{"response":" A","done":false}\n' * 31

    def handler(conn: socket.socket) -> None:
        with conn:
            if read_request(conn, bytearray()) is not None:
                if framing == "chunked":
                    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    conn.sendall(head + chunked(body))
                else:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    )
                time.sleep(0.2)

    async def main() -> None:
        async with OllamaBackend(MODEL, url, timeout=5) as b:
            c = await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        assert c.finish_reason == "repeat" and c.text == " A" * 31

    with raw_server(handler) as url:
        run(main())


@pytest.mark.parametrize("line", [b"<html>", b"[1, 2]"], ids=["not-json", "not-an-object"])
def test_a_line_that_is_not_a_json_object_is_a_retryable_stream_error(line: bytes) -> None:
    def handler(conn: socket.socket) -> None:
        with conn:
            if read_request(conn, bytearray()) is not None:
                body = b'{"response":"a","done":false}\n' + line + b"\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        b = OllamaBackend(MODEL, url, timeout=5)
        with pytest.raises(BackendError) as info:
            await b.complete(PROMPT, sampling=SAMPLING, stop=[])
        assert info.value.cause == "stream_error" and info.value.retryable
        await b.aclose()

    with raw_server(handler) as url:
        run(main())


def test_request_line_and_head_on_the_wire_with_a_path_prefix() -> None:
    """A host with a path (a reverse proxy's prefix): both paths POST to the
    same target, with the same Host."""
    seen: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while (head := read_request(conn, buf)) is not None:
                seen.append(head)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunked(NDJSON)
                )

    async def main() -> None:
        for direct in (True, False):
            b = OllamaBackend(MODEL, url + "/ollama/", timeout=5, direct_stream=direct)
            assert (await b.complete(PROMPT, sampling=SAMPLING, stop=[])).text == "ok"
            await b.aclose()

    with raw_server(handler) as url:
        run(main())
    direct, official = (h.decode() for h in seen)
    for head in (direct, official):
        assert head.startswith("POST /ollama/api/generate HTTP/1.1\r\n")
        assert f"\r\nhost: {url.removeprefix('http://')}\r\n" in head.lower()
    assert "accept-encoding" not in direct.lower()


def test_a_proxy_from_the_environment_is_used_unless_no_proxy_says_otherwise(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    def proxy(conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while (head := read_request(conn, buf)) is not None:
                seen.append(head)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(NDJSON) + NDJSON
                )

    for key in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)

    async def generate(host: str) -> str:
        b = OllamaBackend(MODEL, host, timeout=5)
        text = (await b.complete(PROMPT, sampling=SAMPLING, stop=[])).text
        await b.aclose()
        return text

    with raw_server(proxy) as proxy_url, server() as srv:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        # Through the proxy, as an absolute URL (the host is never resolved here).
        assert run(generate("http://ollama.example.com:11434")) == "ok"
        assert seen[0].startswith(b"POST http://ollama.example.com:11434/api/generate HTTP/1.1\r\n")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert run(generate(srv.url))  # straight to the server
        assert len(seen) == 1 and len(srv.requests_to("/api/generate")) == 1
