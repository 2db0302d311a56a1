"""Prompts of the embedded engine: chats rendered through llama-cpp-python's
own chat handlers, raw prompt tokens, shared prefixes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from magpie.errors import BackendError


class _Captured(Exception):
    """Raised by :class:`_PromptCapture` to stop a chat handler before it generates."""


class _PromptCapture:
    """Stands in for ``llama_cpp.Llama`` inside a chat handler.

    The handler renders the messages with the model's chat template, tokenizes
    them and calls ``create_completion``; this proxy records that call's
    arguments (prompt tokens, stop strings, grammar) instead of generating, so
    the prompt is exactly the one ``Llama.create_chat_completion`` would use.
    """

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.kwargs: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        raise _Captured


@dataclass
class ChatPrompt:
    """A rendered chat prompt: tokens, stop strings and an optional GBNF grammar."""

    tokens: list[int]
    stop: list[str]
    grammar: str | None = None


def render_chat(
    llm: Any, messages: list[dict[str, str]], json_schema: dict[str, Any] | None = None
) -> ChatPrompt:
    """Render ``messages`` exactly as ``llm.create_chat_completion`` would.

    The model's own chat handler (for a GGUF with a Jinja template: a
    ``Jinja2ChatFormatter`` handler, with SmolLM2's default system block) is run
    against a :class:`_PromptCapture`, which returns the prompt tokens and stop
    strings it would have completed.
    """
    from llama_cpp import llama_chat_format

    handler = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)  # noqa: SLF001 - same lookup as Llama
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    capture = _PromptCapture(llm)
    response_format = (
        {"type": "json_object", "schema": json_schema} if json_schema is not None else None
    )
    with contextlib.suppress(_Captured):
        handler(llama=capture, messages=messages, stop=[], response_format=response_format)
    kwargs = capture.kwargs
    if "prompt" not in kwargs:
        raise BackendError(
            f"the chat handler of {llm.chat_format!r} did not produce a prompt",
            retryable=False,
            cause="chat_template",
        )
    prompt = kwargs["prompt"]
    tokens = list(prompt) if not isinstance(prompt, str) else raw_prompt_tokens(llm, prompt)
    stop = kwargs.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    grammar = kwargs.get("grammar")
    return ChatPrompt(tokens, stop, getattr(grammar, "_grammar", None))


def raw_prompt_tokens(llm: Any, prompt: str) -> list[int]:
    """Tokenize a raw prompt as ``Llama.create_completion`` does: BOS only when
    the model asks for it, special tokens parsed."""
    bos = llm.token_bos()
    lead = [bos] if prompt and bos != -1 and llm._model.add_bos_token() else []  # noqa: SLF001
    return lead + (
        llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
