"""Ollama's generation wire format: the ``options`` of a request, and a
streamed ``/api/generate`` or ``/api/chat`` reply (NDJSON, one chunk per token)
gathered into one Completion, with the caller's abort check.

Two ways to the same reply: :func:`stream_direct` over the shared
:class:`~magpie.backends.http.AioSession` (the default), :func:`stream_client`
through ``ollama.AsyncClient``.  Both raise what their client raises
(``ollama.ResponseError`` for an HTTP error or an error line, the transport's
own errors); the backend translates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magpie.backends.base import AbortCheck, Completion, Sampling
from magpie.backends.http import AioSession, LineSplitter
from magpie.errors import BackendError

if TYPE_CHECKING:
    import aiohttp

#: Headers of the official client's httpx client that the direct path does not
#: send as they are: aiohttp writes Host, Content-Length and Connection itself,
#: and no Accept-Encoding asks for identity bodies (Ollama does not compress
#: NDJSON; a compressing proxy in between would hold lines back).
NOT_SENT = frozenset({"accept-encoding", "connection", "content-length", "host"})

#: A chunk's text (or thinking) as the reply's field names have it.
Piece = Callable[[Any], str]


#: Sent with every /api/generate and /api/chat request (Ollama 0.12.6 and
#: later; older servers ignore them).  Both default to true: a prompt longer
#: than the context is cut silently (``truncate``: the start of a raw prompt,
#: the first messages of a chat) and a generation that reaches the end of the
#: context drops early tokens and goes on (``shift``).  With both false the
#: server answers 400 ``exceed_context_size_error`` for such a prompt, and a
#: generation stops at the end of the context (``done_reason`` "length").
#: ``shift`` is also how the server loads the model (llama-server's
#: ``--context-shift``): requests that differ in it reload the model, so every
#: request magpie sends to a model, render included, sends the same.
NO_CUTS: dict[str, Any] = {"truncate": False, "shift": False}


def request_options(
    sampling: Sampling, seed: int | None, stop: list[str] | None, num_ctx: int | None = None
) -> dict[str, Any]:
    """The ``options`` of a generation request: the sampling, and ``num_ctx``
    when one is set (``--num-ctx``; else the model's or the server's)."""
    opts: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "num_predict": sampling.max_tokens,
    }
    if sampling.top_k is not None:
        opts["top_k"] = sampling.top_k
    if sampling.repeat_penalty is not None:
        opts["repeat_penalty"] = sampling.repeat_penalty
    if sampling.min_p is not None:
        opts["min_p"] = sampling.min_p
    if seed is not None:
        opts["seed"] = seed
    if stop:
        opts["stop"] = list(stop)
    if num_ctx is not None:
        opts["num_ctx"] = num_ctx
    return opts


async def client_stream(client: Any, path: str, body: dict[str, Any]) -> Any:
    """A streaming request of ``ollama.AsyncClient`` with a body the caller
    built (with the client's own request types, plus :data:`NO_CUTS`, which
    the client's ``generate``/``chat`` do not take): its chunks as the
    client's ``GenerateResponse`` / ``ChatResponse``, its errors its own."""
    import ollama

    cls = ollama.GenerateResponse if path == "/api/generate" else ollama.ChatResponse
    return await client._request(cls, "POST", path, json=body, stream=True)  # noqa: SLF001


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


def _aborted(text: str, thinking: str, chunks: int) -> Completion:
    # One chunk per token: the count stands in for eval_count.
    return Completion(
        text=text, finish_reason="abort", completion_tokens=chunks, thinking=thinking or None
    )


def _ended(
    text: str,
    thinking: str,
    chunks: int,
    done: bool,
    reason: str | None,
    prompt_tokens: int | None,
    eval_count: int | None,
) -> Completion:
    if not done:
        # The body ended cleanly (a torn one raises) without a done line:
        # Ollama's repeat guard cut the generation.
        return Completion(
            text=text, finish_reason="repeat", completion_tokens=chunks, thinking=thinking or None
        )
    reason = reason or "unknown"
    return Completion(
        text=text,
        finish_reason=reason if reason in ("stop", "length") else "unknown",
        prompt_tokens=prompt_tokens,
        completion_tokens=eval_count,
        thinking=thinking or None,
    )


async def stream_direct(
    session: AioSession,
    path: str,
    payload: dict[str, Any],
    piece: Piece,
    abort: AbortCheck | None,
    thought: Piece | None = None,
) -> Completion:
    """POST ``payload`` to ``path`` and gather the NDJSON reply: the request
    body and headers of ``ollama.AsyncClient``, lines parsed with ``json``, its
    errors (``ollama.ResponseError`` for HTTP errors and error lines)."""
    import ollama

    text = thinking = ""
    chunks = 0
    last: dict[str, Any] | None = None
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    resp: aiohttp.ClientResponse | None = None
    complete = False  # the body was read to its end: the connection is pooled
    try:
        with session.watchdog() as watchdog:
            resp = await session.post(path, data.encode("utf-8"))
            watchdog.tick()
            if resp.status >= 400:
                body = (await resp.read()).decode("utf-8", "replace")
                raise ollama.ResponseError(body, resp.status)
            reader = resp.content
            lines = LineSplitter()
            while True:
                block = await reader.readany()
                if not block:
                    break
                watchdog.tick()
                for line in lines.feed(block):
                    part = _json_line(line)
                    if err := part.get("error"):
                        raise ollama.ResponseError(err)
                    text += piece(part)
                    if thought is not None:
                        thinking += thought(part)
                    chunks += 1
                    last = part
                    if abort is not None and not part.get("done") and abort(thinking + text):
                        return _aborted(text, thinking, chunks)
        complete = True
        if (rest := lines.rest()) is not None:  # a last line without its newline
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
    if last is None:
        return _ended(text, thinking, chunks, False, None, None, None)
    return _ended(
        text,
        thinking,
        chunks,
        bool(last.get("done")),
        last.get("done_reason"),
        last.get("prompt_eval_count"),
        last.get("eval_count"),
    )


async def stream_client(
    call: Callable[[], Any], piece: Piece, abort: AbortCheck | None, thought: Piece | None = None
) -> Completion:
    """Run a streaming request of ``ollama.AsyncClient`` (``call``) and gather
    its chunks.  When ``abort`` says so, the stream is closed (Ollama then
    cancels the generation) and the text so far comes back with finish reason
    "abort"."""
    text = thinking = ""
    chunks = 0
    last = None
    stream = await call()
    try:
        async for chunk in stream:
            text += piece(chunk)
            if thought is not None:
                thinking += thought(chunk)
            chunks += 1
            last = chunk
            if abort is not None and not chunk.done and abort(thinking + text):
                return _aborted(text, thinking, chunks)
    finally:
        await stream.aclose()
    if last is None:
        return _ended(text, thinking, chunks, False, None, None, None)
    return _ended(
        text,
        thinking,
        chunks,
        bool(last.done),
        last.done_reason,
        last.prompt_eval_count,
        last.eval_count,
    )
