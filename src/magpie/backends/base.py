"""The backend contract: the three things magpie asks of a model server.

A backend can

(a) ``complete`` a raw prompt (no chat template applied) with stop strings and a
    token limit, returning text, finish reason and token counts;
(b) ``chat``: answer a list of chat messages with the model's own chat template;
(c) ``describe`` the model: its name, chat template text, default system prompt,
    family and digest, for template detection and the run manifest.

``abort`` (optional) is called with the text generated so far while a request
runs; when it returns True the backend stops the generation and returns what it
has with finish reason ``"abort"``.

Optionally, a backend whose server samples ``n`` completions of one prompt in a
single request (OpenAI-compatible servers' ``n``: vLLM prefills the prompt once
for all of them) says so with ``supports_complete_n()`` and implements
``complete_n``; the pipeline uses it for ``--samples-per-request N``.  In the
same way a backend whose server has an embedding endpoint (Ollama
``/api/embed``, OpenAI-compatible ``/v1/embeddings``) says so with
``supports_embed()`` and implements ``embed``: semantic dedup
(:mod:`magpie.pipeline.stages.dedup.embeddings`) uses it, with an embedding model as the backend's
model.

Reasoning models: ``chat(think=...)`` asks the server to think (True), not to
think (False), or leaves it to the server's default (None: Ollama thinks when the
model can).  What the server returns apart from the answer (Ollama's
``thinking``, an OpenAI-compatible server's ``reasoning_content``) comes back in
:attr:`Completion.thinking`; reasoning written inline (``<think>...</think>``) is
left in the text for :mod:`magpie.pipeline.stages.reasoning` to split.  Raw
completions (``complete``) never ask the server to parse thinking: the text comes
back exactly as the model wrote it.

Backends raise :class:`magpie.errors.BackendUnavailable` (server down),
:class:`magpie.errors.ModelNotFound` (model missing) and
:class:`magpie.errors.BackendError` (a failed request, ``retryable`` when a retry
may help).  Retrying is not a backend's job: :mod:`magpie.backends.retry` does it once for
all backends.  A backend only sends each of its start-up requests (those that are
not generations) through :meth:`Backend._start_request`, which retries it by the
policy :meth:`Backend.retry_start_requests` gave (``choose_backend`` gives one to
every backend it opens).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.retry import RetryPolicy, call_with_retry

T = TypeVar("T")

#: "abort": the caller's ``abort`` check stopped the generation (a loop).
#: "repeat": the server's own repeat guard ended it: Ollama closes a stream
#: without a ``done`` line after more than 30 equal tokens in a row (runs of
#: newlines, "the the the ..."); the text so far comes back.
FinishReason = Literal["stop", "length", "abort", "repeat", "error", "unknown"]
#: Called with the text generated so far, as it streams; True stops the generation.
AbortCheck = Callable[[str], bool]


class Sampling(BaseModel):
    """Sampling settings of one stage (instruction or response)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    #: 0 disables top-k.  Sent explicitly: servers default to 40 otherwise.
    top_k: int | None = Field(0, ge=0)
    repeat_penalty: float | None = Field(1.0, gt=0.0)
    #: Drop tokens less likely than ``min_p`` times the most likely one, before
    #: the temperature (Nguyen et al. 2024): a small model stays coherent at a
    #: higher temperature.  None sends nothing (Ollama's default is 0, llama.cpp's
    #: and llama-server's 0.05); the embedded backend then uses 0.
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int = Field(512, gt=0, le=1_000_000)


class Completion(BaseModel):
    """What a backend returns for one request."""

    text: str
    finish_reason: FinishReason = "unknown"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: The host that answered (set by a multi-host pool).
    host: str | None = None
    #: The model's reasoning when the server returned it apart from ``text``
    #: (Ollama ``thinking``, OpenAI-compatible ``reasoning_content``); None when
    #: it returned none.
    thinking: str | None = None


class ModelInfo(BaseModel):
    """What a backend knows about its model."""

    backend: str
    model: str
    host: str | None = None
    #: The chat template as the server stores it: Ollama's Go template text, or
    #: the GGUF's Jinja template (``tokenizer.chat_template``).
    template: str | None = None
    template_kind: Literal["go", "jinja"] | None = None
    #: The model's default system prompt (Ollama ``SYSTEM``), if it has one.
    system: str | None = None
    #: Ollama ``details.family`` or GGUF ``general.architecture``.
    family: str | None = None
    digest: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    #: Whether the backend's tokenizer adds a BOS token to a raw prompt itself
    #: (then a leading BOS string in the pre-query must be dropped).
    adds_bos: bool = True
    #: The model's own stop strings (Ollama ``PARAMETER stop``).
    stop: list[str] = Field(default_factory=list)
    #: What the server says the model can do (Ollama ``capabilities``:
    #: "completion", "embedding", "thinking", ...); None when it does not say.
    capabilities: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class Backend(abc.ABC):
    """Abstract base of every backend.  All request methods are coroutines."""

    #: Short name used in records and messages ("ollama", "embedded").
    name: str = "backend"
    #: How :meth:`render_chat` renders (the pre-query's ``source`` in records).
    render_source: str = "server-render"
    #: Requests in flight that ``--concurrency auto`` keeps on this backend.
    auto_concurrency: int = 1
    #: How each start-up request is retried (:meth:`retry_start_requests`).
    _start_policy: RetryPolicy | None = None
    _on_start_retry: Callable[[str], None] | None = None

    @property
    @abc.abstractmethod
    def model(self) -> str:
        """The model name or path this backend serves."""

    @property
    def host(self) -> str | None:
        return None

    @abc.abstractmethod
    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        """Complete a raw prompt; no chat template is applied."""

    @abc.abstractmethod
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
        """Answer chat messages with the model's own chat template.

        With ``json_schema`` the answer is constrained to JSON matching it
        (structured output: the judge uses it).  ``think``: ask a reasoning
        model to think (True) or not (False); None leaves it to the server."""

    def supports_complete_n(self) -> bool:
        """Whether :meth:`complete_n` samples ``n`` completions in one request."""
        return False

    async def complete_n(
        self,
        prompt: str,
        n: int,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
    ) -> list[Completion]:
        """``n`` raw completions of one prompt from one request, in choice order
        (fewer when the server returns fewer).  Only where
        :meth:`supports_complete_n` is True."""
        raise NotImplementedError(f"the {self.name} backend samples one completion per request")

    def supports_embed(self) -> bool:
        """Whether :meth:`embed` turns texts into vectors (an embedding endpoint)."""
        return False

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order, from one request to the backend's model
        (an embedding model).  Only where :meth:`supports_embed` is True."""
        raise NotImplementedError(f"the {self.name} backend has no embedding endpoint")

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt the server's chat template renders for ``messages`` (with
        the generation prompt, the model's default system prompt when there is
        no system message), without running the model; None when the server
        cannot render (then the pre-query comes from marker matching)."""
        return None

    @abc.abstractmethod
    async def describe(self) -> ModelInfo:
        """Describe the model (raises ModelNotFound / BackendUnavailable)."""

    async def probe(self) -> str:
        """One line on what answers (a server's version and address, or the
        engine in process), without loading a model: ``magpie doctor``'s
        "reachable" check.  Raises BackendUnavailable (nothing answers) or
        BackendError (something else answers), with a ``fix``."""
        return f"the {self.name} backend"

    async def check_model(self) -> tuple[ModelInfo, str]:
        """The model's description and one line on it (``magpie doctor``'s
        "model" check).  Raises ModelNotFound / UsageError with a ``fix``."""
        info = await self.describe()
        return info, self.model + (f" on {self.host}" if self.host else "")

    def retry_start_requests(
        self, policy: RetryPolicy | None, on_retry: Callable[[str], None] | None = None
    ) -> None:
        """Retry each start-up request of this backend by ``policy`` (None: not
        at all), calling ``on_retry`` with the cause of each retry.

        The start-up requests are the ones that are not generations: what
        :meth:`describe`, :meth:`render_chat`, :meth:`probe` and
        :meth:`check_model` ask.  Each is retried by itself, not the method
        that makes several (a busy server answers some of them 503), and an
        error that a retry may cure (5xx, 429, a timeout) is raised to be
        retried, never read as "the server has no such endpoint".  A backend
        that sends no requests (in process) has nothing to retry."""
        self._start_policy = policy
        self._on_start_retry = on_retry

    async def _start_request(self, request: Callable[[], Awaitable[T]]) -> T:
        """Await one start-up request (``request()``, raising magpie's errors),
        retried by the policy of :meth:`retry_start_requests`."""
        if self._start_policy is None:
            return await request()
        return await call_with_retry(request, self._start_policy, self._on_start_retry)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or the model."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
