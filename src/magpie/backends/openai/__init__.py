"""The OpenAI-compatible backend: vLLM, SGLang, llama.cpp ``llama-server``, LM Studio.

Raw pre-queries go through ``POST /v1/completions`` (the prompt is tokenized as
sent, no chat template), responses through ``POST /v1/chat/completions`` (the
server applies the model's chat template).  Both stream Server-Sent Events, so
``timeout`` bounds the silence between two chunks, not the length of a
generation.  :meth:`OpenAIBackend.complete_n` asks for ``n`` samples of one
prompt in one request, which vLLM serves with a single prefill.

Sampling on the wire: ``temperature``, ``top_p``, ``max_tokens``, ``seed`` and
``stop`` are standard.  ``top_k`` and the repetition penalty are extra fields
that vLLM, SGLang, llama.cpp and LM Studio read (OpenAI's own API rejects
them): ``top_k`` 0 (disabled) is sent as -1, which every one of those servers
reads as "off" (llama.cpp would otherwise use 40, and older vLLM rejects 0);
``top_k = None`` leaves the field out.  The repetition penalty is sent as
``repetition_penalty`` (vLLM, SGLang; llama.cpp ignores it) unless it is None,
and also as ``repeat_penalty`` (llama.cpp, LM Studio) when it is not 1.0:
vLLM logs a warning for every request with a field it does not know, and 1.0
is llama.cpp's default anyway.

The chat template is known only where the server exposes it: llama.cpp's
``GET /props`` has the GGUF's Jinja ``chat_template`` and the BOS/EOS strings.
vLLM and the others do not, so ``describe()`` returns ``template=None`` there
and ``--template auto`` asks for ``--template NAME``.  Whether the server adds
BOS to a raw prompt is probed with ``POST /tokenize`` (llama.cpp and vLLM both
have it, with different field names: one body carries both); when the probe
fails it is assumed (``adds_bos=True``).

Why httpx and not the shared aiohttp session Ollama's generation uses
(:class:`~magpie.backends.http.AioSession`): ``timeout`` here is httpx's, per
connect, read, write and pool wait of each request, where the session's is the
server's silence across all requests of a run; the session only POSTs; and
``aiter_lines`` splits on every newline SSE allows.  Moving would change when a
request times out; what is shared does not depend on the client (the SSE field
reader, the transport-error table, retryable statuses, error bodies:
:mod:`magpie.backends.http`).

- :mod:`~magpie.backends.openai.hosts`: the base URL, checked.
- :mod:`~magpie.backends.openai.wire`: sampling fields; an SSE (or JSON) reply
  gathered choice by choice.
- :mod:`~magpie.backends.openai.backend`: :class:`OpenAIBackend`, the contract.
"""

from magpie.backends.http import error_message
from magpie.backends.openai.backend import DEFAULT_TIMEOUT, SCHEMA_NAME, OpenAIBackend
from magpie.backends.openai.hosts import DEFAULT_HOST, normalize_host, resolve_host
from magpie.backends.openai.wire import sampling_fields

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_TIMEOUT",
    "SCHEMA_NAME",
    "OpenAIBackend",
    "error_message",
    "normalize_host",
    "resolve_host",
    "sampling_fields",
]
