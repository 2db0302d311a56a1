"""The Ollama backend: the official ``ollama`` client (AsyncClient) over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.errors import BackendError, BackendUnavailable, ModelNotFound, UsageError

DEFAULT_HOST = "http://127.0.0.1:11434"
#: Seconds without a byte from the server before a request fails (and is retried).
DEFAULT_TIMEOUT = 300.0

_SYSTEM_RE = [
    re.compile(r'^SYSTEM\s+"""(.*?)"""', re.S | re.M),
    re.compile(r'^SYSTEM\s+"((?:[^"\\]|\\.)*)"\s*$', re.M),
    re.compile(r"^SYSTEM\s+(.+)$", re.M),
]


def resolve_host(host: str | None) -> str:
    """The host URL as the ollama client resolves it (argument, OLLAMA_HOST, default)."""
    from ollama._client import _parse_host

    return _parse_host(host or os.getenv("OLLAMA_HOST"))


def validate_host(host: str) -> str:
    """Check that ``host`` looks like a URL or host[:port]; return the resolved URL."""
    if (
        not host
        or any(c.isspace() for c in host)
        or "://" in host
        and not host.startswith(("http://", "https://"))
    ):
        raise UsageError(f"--host {host!r} is not a URL: use e.g. http://127.0.0.1:11434")
    try:
        return resolve_host(host)
    except Exception:  # noqa: BLE001 - the client's parser raises various errors
        raise UsageError(f"--host {host!r} is not a URL: use e.g. http://127.0.0.1:11434") from None


def system_from_modelfile(modelfile: str | None) -> str | None:
    """The ``SYSTEM`` prompt of a modelfile as ``ollama show`` prints it."""
    if not modelfile:
        return None
    for rx in _SYSTEM_RE:
        m = rx.search(modelfile)
        if m:
            text = m.group(1)
            if rx is _SYSTEM_RE[1]:
                text = bytes(text, "utf-8").decode("unicode_escape")
            return text
    return None


def _options(sampling: Sampling, seed: int | None, stop: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "num_predict": sampling.max_tokens,
    }
    if sampling.top_k is not None:
        opts["top_k"] = sampling.top_k
    if sampling.repeat_penalty is not None:
        opts["repeat_penalty"] = sampling.repeat_penalty
    if seed is not None:
        opts["seed"] = seed
    if stop:
        opts["stop"] = list(stop)
    return opts


class OllamaBackend(Backend):
    """Talks to ``ollama serve`` through ``ollama.AsyncClient``.

    Requests stream (NDJSON) so that ``timeout`` bounds the silence between two
    chunks, not the length of a generation: a hung server is detected, a long
    answer is not cut.
    """

    name = "ollama"

    def __init__(
        self,
        model: str,
        host: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        keep_alive: str | float | None = None,
    ) -> None:
        import ollama

        self._model = model
        self._host = resolve_host(host)
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._client = ollama.AsyncClient(host=self._host, timeout=timeout)

    @property
    def model(self) -> str:
        return self._model

    @property
    def host(self) -> str:
        return self._host

    # -- error mapping ------------------------------------------------------
    def _translate(self, exc: BaseException) -> Exception:
        import httpx
        import ollama

        if isinstance(exc, ollama.ResponseError):
            code = exc.status_code
            msg = str(exc.error).strip()
            if code == 404:
                return ModelNotFound(
                    f"model {self._model!r} is not on the Ollama server at {self._host}: "
                    f"pull it with `ollama pull {self._model}`"
                )
            if code == -1:
                return BackendError(f"Ollama error mid-stream: {msg}", cause="stream_error")
            if code == 429 or code >= 500 or code == 499:
                return BackendError(f"Ollama answered {code}: {msg}", cause=f"http_{code}")
            return BackendError(
                f"Ollama answered {code}: {msg}", retryable=False, cause=f"http_{code}"
            )
        # The client turns a refused connection into ConnectionError for plain
        # requests, but streaming requests raise httpx.ConnectError as it is.
        if isinstance(exc, ConnectionError | httpx.ConnectError):
            return BackendUnavailable(
                f"Ollama is not reachable at {self._host}: start it with `ollama serve` "
                "(or pass --host / set OLLAMA_HOST)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(
                f"Ollama at {self._host} sent nothing for {self._timeout:g} s", cause="timeout"
            )
        if isinstance(exc, httpx.TransportError):
            return BackendError(
                f"connection to Ollama at {self._host} failed: {exc.__class__.__name__}",
                cause="connection",
            )
        return exc  # type: ignore[return-value]

    async def _stream(self, call: Any, piece: Any, abort: AbortCheck | None) -> Completion:
        """Run a streaming request and gather its chunks into one Completion.

        When ``abort`` says so, the stream is closed (Ollama then cancels the
        generation) and the text so far comes back with finish reason "abort".
        """
        text = ""
        chunks = 0
        last = None
        try:
            stream = await call()
            try:
                async for chunk in stream:
                    text += piece(chunk)
                    chunks += 1
                    last = chunk
                    if abort is not None and not chunk.done and abort(text):
                        # One chunk per token: the count stands in for eval_count.
                        return Completion(
                            text=text, finish_reason="abort", completion_tokens=chunks
                        )
            finally:
                await stream.aclose()
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        if last is None or not last.done:
            raise BackendError("Ollama closed the stream before it was done", cause="connection")
        reason = last.done_reason or "unknown"
        return Completion(
            text=text,
            finish_reason=reason if reason in ("stop", "length") else "unknown",
            prompt_tokens=last.prompt_eval_count,
            completion_tokens=last.eval_count,
        )

    # -- the contract -------------------------------------------------------
    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        options = _options(sampling, seed, stop)
        result = await self._stream(
            lambda: self._client.generate(
                model=self._model,
                prompt=prompt,
                raw=True,
                options=options,
                stream=True,
                keep_alive=self._keep_alive,
            ),
            lambda c: c.response or "",
            abort,
        )
        if not result.text and not result.completion_tokens:
            # Concurrent raw requests against a cold model can come back empty
            # with status 200; that is worth another try.
            raise BackendError("Ollama returned an empty raw response", cause="empty")
        return result

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        sampling: Sampling,
        seed: int | None = None,
        abort: AbortCheck | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> Completion:
        options = _options(sampling, seed, None)
        return await self._stream(
            lambda: self._client.chat(
                model=self._model,
                messages=messages,
                options=options,
                format=json_schema,
                stream=True,
                keep_alive=self._keep_alive,
            ),
            lambda c: (c.message.content or "") if c.message else "",
            abort,
        )

    async def version(self) -> str:
        """The server's version; raises BackendUnavailable when it is down."""
        try:
            resp = await self._client._request_raw("GET", "/api/version")  # noqa: SLF001
            return str(resp.json().get("version", "unknown"))
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            resp = await self._client.list()
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc
        return [m.model_dump() for m in resp.models]

    async def describe(self) -> ModelInfo:
        try:
            show = await self._client.show(self._model)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from exc
        digest = None
        for m in await self.list_models():
            if m.get("model") in (self._model, f"{self._model}:latest"):
                digest = m.get("digest")
                break
        details = show.details.model_dump() if show.details else {}
        return ModelInfo(
            backend=self.name,
            model=self._model,
            host=self._host,
            template=show.template,
            template_kind="go" if show.template else None,
            system=system_from_modelfile(show.modelfile),
            family=details.get("family"),
            digest=digest,
            adds_bos=True,
            extra={"details": details, "parameters": show.parameters or ""},
        )

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            await self._client.close()
