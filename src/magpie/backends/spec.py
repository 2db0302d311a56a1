"""Which backend to open, for what model, where: one :class:`BackendSpec`
section for the generator, the judge and the embedder alike."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from magpie.backends.retry import RetryPolicy

BackendName = Literal["auto", "ollama", "embedded", "openai"]


class BackendSpec(BaseModel):
    """The settings :func:`magpie.backends.registry.choose_backend` opens a
    backend from.  ``RunConfig`` derives one per role (``generator_spec``,
    ``judge_spec``, ``semantic_spec``), so a setting lives in one place."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: BackendName = "auto"
    model: str | None = None
    #: One URL, several (a HostPool over them), or None for the default host.
    host: str | list[str] | None = None
    #: Requests in flight per host when there are several.
    per_host: int | None = None
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    timeout: float = 300.0
    keep_alive: str | None = None
    #: The model's context in tokens (``--num-ctx``): Ollama's ``num_ctx``, the
    #: embedded backend's context per sequence (None: 4096 there, the model's
    #: or the server's own on Ollama).  An OpenAI-compatible server fixes its
    #: own when it starts.
    num_ctx: int | None = None
    #: The retries of each start-up request (show, the pre-query render, ...;
    #: see :meth:`magpie.backends.base.Backend.retry_start_requests`); None: none.
    retry: RetryPolicy | None = None
    threads: int | None = None

    @property
    def hosts(self) -> list[str | None]:
        if isinstance(self.host, list):
            return list(self.host)
        return [self.host]
