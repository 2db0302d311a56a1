"""The HTTP layer the server backends share (``magpie.backends.http``), on its
own: the NDJSON splitter and the SSE reader on bodies cut anywhere, the table
of transport errors, retryable statuses, error bodies, the silence watchdog;
and how each backend names what the table finds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import aiohttp
import httpx
import pytest

from conftest import free_port
from magpie.backends.http import (
    AioSession,
    LineSplitter,
    error_message,
    retryable_status,
    sse_fields,
    transport_failure,
)
from magpie.backends.ollama import OllamaBackend
from magpie.backends.openai import OpenAIBackend
from magpie.backends.openai.wire import events
from magpie.errors import BackendError, BackendUnavailable

NDJSON = (
    b'{"response":"Hel","done":false}\n'
    b"\n"
    b'{"response":"lo \\u00e9\xc3\xa9","done":false}\r\n'
    b"   \n"
    b'{"response":"","done":true,"done_reason":"stop"}'
)
LINES = [
    b'{"response":"Hel","done":false}',
    b'{"response":"lo \\u00e9\xc3\xa9","done":false}\r',
    b'{"response":"","done":true,"done_reason":"stop"}',
]


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    out, last = [], 0
    for cut in sorted(cuts):
        out.append(body[last:cut])
        last = cut
    return [*out, body[last:]]


def lines_of(blocks: list[bytes]) -> list[bytes]:
    splitter = LineSplitter()
    got = [line for block in blocks for line in splitter.feed(block)]
    rest = splitter.rest()
    return got + ([rest] if rest is not None else [])


# --------------------------------------------------------------------------- NDJSON


def test_ndjson_lines_are_the_same_wherever_the_body_is_cut() -> None:
    assert lines_of([NDJSON]) == LINES
    for i in range(len(NDJSON) + 1):
        assert lines_of(split(NDJSON, [i])) == LINES, i
    for i in range(0, len(NDJSON), 7):
        assert lines_of(split(NDJSON, [i, i + 3, i + 4])) == LINES, i
    assert lines_of([bytes([b]) for b in NDJSON]) == LINES  # a byte at a time


def test_ndjson_a_finished_body_leaves_no_rest() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a":1}\n  \n') == [b'{"a":1}']
    assert splitter.feed(b"") == []
    assert splitter.rest() is None
    splitter.feed(b"  ")
    assert splitter.rest() is None  # a blank tail is no line
    splitter.feed(b'{"b"')
    splitter.feed(b":2}")
    assert splitter.rest() == b'{"b":2}'
    assert splitter.rest() is None


# --------------------------------------------------------------------------- SSE


async def aiter(items: Iterable[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def collect(it: AsyncIterator) -> list:  # type: ignore[type-arg]
    return [x async for x in it]


def test_sse_fields_skip_comments_and_blank_lines() -> None:
    lines = [": keep-alive", "", "event: message", 'data: {"a": 1}', "data:", "id:7 ", "data"]
    got = asyncio.run(collect(sse_fields(aiter(lines))))
    assert got == [
        ("event", "message"),
        ("data", '{"a": 1}'),
        ("data", ""),
        ("id", "7"),
        ("data", ""),
    ]


def test_sse_events_are_the_same_wherever_the_body_is_cut() -> None:
    """An SSE body cut anywhere reads as the same events through httpx's line
    decoder (what the OpenAI backend reads it with) and the shared reader."""
    body = (
        b": ping\r\n\r\n"
        b'data: {"choices":[{"index":0,"text":"h\xc3\xa9"}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,"text":"!","finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"never": "read"}\n\n'
    )
    want = [
        {"choices": [{"index": 0, "text": "hé"}]},
        {"choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]},
    ]

    async def read(blocks: list[bytes]) -> list[dict]:  # type: ignore[type-arg]
        async def stream() -> AsyncIterator[bytes]:
            for block in blocks:
                yield block

        resp = httpx.Response(200, content=stream())
        return await collect(events(resp.aiter_lines(), "http://h"))

    for i in range(len(body) + 1):
        assert asyncio.run(read(split(body, [i]))) == want, i


@pytest.mark.parametrize(
    "line",
    ['error: {"message": "slot gone"}', 'data: {"error": {"message": "slot gone"}}'],
)
def test_sse_error_events_raise_a_retryable_stream_error(line: str) -> None:
    with pytest.raises(BackendError) as info:
        asyncio.run(collect(events(aiter([line]), "http://h")))
    assert info.value.retryable and info.value.cause == "stream_error"
    assert "slot gone" in str(info.value)


# --------------------------------------------------------------------------- errors


def test_the_transport_error_table() -> None:
    assert transport_failure(httpx.ConnectError("refused")) == "unreachable"
    assert transport_failure(httpx.ReadTimeout("slow")) == "timeout"
    assert transport_failure(httpx.ConnectTimeout("slow")) == "timeout"
    assert transport_failure(httpx.RemoteProtocolError("torn")) == "connection"
    assert transport_failure(aiohttp.ServerTimeoutError()) == "timeout"
    assert transport_failure(aiohttp.ClientPayloadError("torn")) == "connection"
    assert transport_failure(aiohttp.ServerDisconnectedError()) == "connection"
    # A reset mid-stream is also a builtin ConnectionError: not "unreachable".
    reset = aiohttp.ClientConnectionResetError("reset")
    assert isinstance(reset, ConnectionError)
    assert transport_failure(reset) == "connection"
    # The watchdog's timeout only where a watchdog timed the request.
    assert transport_failure(asyncio.TimeoutError(), watchdog=True) == "timeout"
    assert transport_failure(asyncio.TimeoutError()) is None
    for other in (ValueError("x"), ConnectionError("x"), BackendError("x")):
        assert transport_failure(other) is None


def test_a_refused_connection_on_the_session_is_unreachable() -> None:
    async def main() -> BaseException:
        session = AioSession(f"http://127.0.0.1:{free_port()}", {}, 5.0)
        try:
            await session.post("/api/chat", b"{}")
        except Exception as exc:  # noqa: BLE001 - the subject
            return exc
        finally:
            await session.aclose()
        raise AssertionError("connected to a closed port")

    exc = asyncio.run(main())
    assert isinstance(exc, aiohttp.ClientConnectorError)
    assert transport_failure(exc) == "unreachable"


def test_each_backend_names_the_failures_its_own_way() -> None:
    ollama = OllamaBackend("m", "http://127.0.0.1:1")
    openai = OpenAIBackend("m", "http://127.0.0.1:1")
    for backend in (ollama, openai):
        assert isinstance(backend._translate(httpx.ConnectError("x")), BackendUnavailable)
        timeout = backend._translate(httpx.ReadTimeout("x"))
        assert isinstance(timeout, BackendError) and timeout.cause == "timeout"
        torn = backend._translate(httpx.RemoteProtocolError("x"))
        assert isinstance(torn, BackendError) and torn.cause == "connection"
    # The ollama client raises ConnectionError for a refused plain request;
    # httpx never does, and the OpenAI backend lets one through as it is.
    assert isinstance(ollama._translate(ConnectionError()), BackendUnavailable)
    refused = ConnectionError()
    assert openai._translate(refused) is refused
    # The direct path's watchdog fires asyncio.TimeoutError.
    assert ollama._translate(asyncio.TimeoutError()).cause == "timeout"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "also", "retry"),
    [
        (500, frozenset(), True),
        (503, frozenset(), True),
        (429, frozenset(), False),
        (429, frozenset({429, 499}), True),
        (499, frozenset({429, 499}), True),
        (408, frozenset({429, 499}), False),
        (408, frozenset({408, 429}), True),
        (400, frozenset({408, 429}), False),
        (404, frozenset({408, 429}), False),
    ],
)
def test_retryable_statuses(status: int, also: frozenset[int], retry: bool) -> None:
    assert retryable_status(status, also) is retry


def test_error_bodies() -> None:
    assert error_message(b'{"error": {"message": "bad k", "code": 400}}') == "bad k"
    assert error_message(b'{"error": "model \\"x\\" not found"}') == 'model "x" not found'
    assert error_message(b'{"object": "error", "message": "old vllm"}') == "old vllm"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"  Bad Gateway\n") == "Bad Gateway"
    assert error_message(b"\xff" + b"x" * 400) == ("\ufffd" + "x" * 400)[:300]


# --------------------------------------------------------------------------- watchdog


@pytest.mark.slow
def test_the_watchdog_times_silence_not_length() -> None:
    session = AioSession("http://127.0.0.1:1", {}, 1.0)

    async def talking() -> None:  # a byte every 0.05 s for 1.5 s: alive
        with session.watchdog() as dog:
            for _ in range(30):
                await asyncio.sleep(0.05)
                dog.tick()

    async def silent() -> None:
        with session.watchdog():
            await asyncio.sleep(5)

    asyncio.run(talking())
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(silent())


def test_the_watchdog_counts_the_whole_sessions_bytes() -> None:
    """A request queued behind others gets no bytes while they stream: the
    server is alive, so it waits."""
    session = AioSession("http://127.0.0.1:1", {}, 1.0)

    async def main() -> None:
        async def streaming() -> None:
            with session.watchdog() as dog:
                for _ in range(30):
                    await asyncio.sleep(0.05)
                    dog.tick()

        async def queued() -> None:  # past its own deadline, within the session's
            with session.watchdog():
                await asyncio.sleep(1.3)

        await asyncio.gather(streaming(), queued())

    asyncio.run(main())
