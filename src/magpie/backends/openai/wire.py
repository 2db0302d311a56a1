"""The OpenAI-compatible wire format: a stage's sampling as request fields,
and a reply (Server-Sent Events, or one JSON body) gathered choice by choice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from magpie.backends.base import Completion, FinishReason, Sampling
from magpie.backends.http import error_message, sse_fields
from magpie.errors import BackendError


def sampling_fields(sampling: Sampling, seed: int | None, stop: list[str] | None) -> dict[str, Any]:
    """The request fields for one stage's sampling settings (see :mod:`magpie.backends.openai`)."""
    body: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.top_k is not None:
        body["top_k"] = sampling.top_k if sampling.top_k > 0 else -1
    if sampling.repeat_penalty is not None:
        body["repetition_penalty"] = sampling.repeat_penalty
        if sampling.repeat_penalty != 1.0:
            body["repeat_penalty"] = sampling.repeat_penalty
    if sampling.min_p is not None:
        body["min_p"] = sampling.min_p  # vLLM, SGLang, llama.cpp, LM Studio
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    return body


def _finish(reason: Any) -> FinishReason:
    return reason if reason in ("stop", "length") else "unknown"


@dataclass
class Choice:
    """One choice of a (streamed) reply as it is gathered."""

    text: str = ""
    finish: Any = None
    chunks: int = 0
    #: The reasoning the server parsed out of the answer (``reasoning_content``:
    #: llama-server, DeepSeek, older vLLM; ``reasoning``: newer vLLM).
    reasoning: str = ""


@dataclass
class Reply:
    """A whole reply: its choices by index and the server's usage, if sent."""

    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    aborted: bool = False

    def add(self, data: dict[str, Any]) -> Choice | None:
        """Take one chunk (or a whole non-streamed reply); return choice 0 if it grew."""
        grown = None
        for raw in data.get("choices") or []:
            index = int(raw.get("index") or 0)
            choice = self.choices.setdefault(index, Choice())
            piece = raw.get("text")
            if piece is None:  # chat: "delta" when streamed, "message" when not
                message = raw.get("delta") or raw.get("message") or {}
                piece = message.get("content")
                thought = message.get("reasoning_content") or message.get("reasoning")
                if isinstance(thought, str) and thought:
                    choice.reasoning += thought
                    choice.chunks += 1
            if piece:
                choice.text += piece
                choice.chunks += 1
                grown = choice if index == 0 else grown
            if raw.get("finish_reason"):
                choice.finish = raw["finish_reason"]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        return grown

    def completion(self, index: int = 0, *, own_usage: bool = True) -> Completion:
        """One choice as a Completion.

        ``prompt_tokens`` comes from the server's usage; ``completion_tokens``
        too when ``own_usage`` (the reply has this one choice), else it is the
        choice's chunk count (one token per chunk as the servers stream).
        """
        choice = self.choices.get(index, Choice())
        usage = self.usage or {}
        completion_tokens = usage.get("completion_tokens") if own_usage else None
        return Completion(
            text=choice.text,
            finish_reason="abort" if self.aborted else _finish(choice.finish),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=choice.chunks if completion_tokens is None else completion_tokens,
            thinking=choice.reasoning or None,
        )


async def events(lines: AsyncIterator[str], host: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of an SSE body (``data: {...}``) up to ``data: [DONE]``.

    Error events (``data: {"error": ...}`` from vLLM, ``error: {...}`` from
    llama.cpp) raise a retryable BackendError.
    """
    async for field_name, value in sse_fields(lines):
        if field_name == "error":
            raise BackendError(
                f"the server at {host} failed mid-stream: {error_message(value.encode())}",
                cause="stream_error",
            )
        if field_name != "data" or not value:
            continue  # event names, ids, empty data
        if value == "[DONE]":
            return
        try:
            data = json.loads(value)
        except ValueError:
            raise BackendError(
                f"the server at {host} sent a malformed event: {value[:100]!r}",
                cause="stream_error",
            ) from None
        if not isinstance(data, dict):
            continue
        if "error" in data or data.get("object") == "error":
            raise BackendError(
                f"the server at {host} failed mid-stream: {error_message(value.encode())}",
                cause="stream_error",
            )
        yield data
