"""Choosing and opening a backend: ``--backend auto|ollama|openai|embedded``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from magpie.backends.base import Backend
from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.backends.spec import BackendSpec
from magpie.errors import BackendError, BackendUnavailable, MagpieError, UsageError

#: The Ollama model ``auto`` uses when none is named and the server has it.
DEFAULT_OLLAMA_MODEL = "llama3.1"
#: How long ``auto`` waits for an Ollama server before using the embedded model.
PROBE_TIMEOUT = 2.0


@dataclass
class BackendChoice:
    backend: Backend
    #: One line for stderr: which backend, and why.
    reason: str


def looks_like_gguf(model: str | None) -> bool:
    return bool(model) and (model.lower().endswith(".gguf") or Path(model).expanduser().is_file())


#: Sequences the embedded backend decodes at once under ``--concurrency auto``.
EMBEDDED_AUTO_BATCH = 16
#: The embedded backend's context per sequence when ``--num-ctx`` is not given.
EMBEDDED_N_CTX = 4096


def _embedded(spec: BackendSpec) -> Backend:
    """The batched llama.cpp backend: ``--concurrency`` sequences decoded together
    (16 under ``auto``: 2.5-3.6x a plain sequential loop on 2 cores, see
    benchmarks/README.md); its KV caches take (K + 2) x n_ctx tokens of memory."""
    from magpie.backends.llamacpp.batch import BatchedEmbeddedBackend

    k = spec.concurrency if isinstance(spec.concurrency, int) else EMBEDDED_AUTO_BATCH
    return BatchedEmbeddedBackend(
        spec.model,
        n_ctx=spec.num_ctx or EMBEDDED_N_CTX,
        n_threads=spec.threads,
        max_batch=max(1, k),
    )


def _pooled(spec: BackendSpec, make: Callable[[str | None], Backend]) -> Backend:
    """``make(host)`` for each of ``spec.hosts``; a HostPool over several."""
    backends = [make(host) for host in spec.hosts]
    if len(backends) == 1:
        return backends[0]
    from magpie.backends.pool import HostPool

    per_host = spec.per_host or (spec.concurrency if isinstance(spec.concurrency, int) else 4)
    return HostPool(backends, per_host=per_host)


def _ollama(spec: BackendSpec, model: str) -> Backend:
    from magpie.backends.ollama import OllamaBackend

    return _pooled(
        spec,
        lambda host: OllamaBackend(
            model, host, timeout=spec.timeout, keep_alive=spec.keep_alive, num_ctx=spec.num_ctx
        ),
    )


def _openai(spec: BackendSpec) -> Backend:
    from magpie.backends.openai import OpenAIBackend, resolve_host

    return _pooled(
        spec, lambda host: OpenAIBackend(spec.model, resolve_host(host), timeout=spec.timeout)
    )


def open_backend(spec: BackendSpec) -> Backend:
    """The ``ollama`` or ``openai`` backend named by ``spec.backend``, for
    ``spec.model`` on its hosts (a HostPool over several), not yet contacted;
    its start-up requests retried by ``spec.retry``.  Any other name
    (``auto``) opens Ollama."""
    if spec.backend == "openai":
        backend = _openai(spec)
    else:
        backend = _ollama(spec, spec.model or DEFAULT_OLLAMA_MODEL)
    backend.retry_start_requests(spec.retry)
    return backend


async def choose_judge_backend(spec: BackendSpec) -> BackendChoice:
    """The judge's backend (``RunConfig.judge_spec``: ``--judge MODEL`` on
    ``--judge-backend``/``--judge-host``, by default the generator's host), its
    errors in the judge's flag names.  ``--judge same`` is handled by the caller."""
    try:
        choice = await choose_backend(spec)
    except MagpieError as exc:
        raise _as_judge(exc) from None
    return BackendChoice(choice.backend, "judge " + choice.reason)


_GENERATOR_FLAGS = re.compile(r"--(model|backend|host)\b")
_JUDGE_FLAGS = {"model": "--judge", "backend": "--judge-backend", "host": "--judge-host"}


def _as_judge(exc: MagpieError) -> MagpieError:
    """The error of the judge's backend, in the judge's flag names (``--judge``,
    not the generator's ``--model``)."""

    def judge_flags(text: str) -> str:
        return _GENERATOR_FLAGS.sub(lambda m: _JUDGE_FLAGS[m.group(1)], text)

    exc.message = "judge: " + judge_flags(exc.message)
    if exc.fix:
        exc.fix = judge_flags(exc.fix)
    return exc


async def open_judge_backend(spec: BackendSpec, retry: RetryPolicy) -> Backend:
    """The judge's backend (:func:`choose_judge_backend`), its model checked with
    ``describe()``: 5xx and timeouts are retried, a refused connection fails at
    once (exit 3), and the backend is closed when the check fails."""
    backend = (await choose_judge_backend(spec)).backend
    try:
        if spec.retry is None:  # a spec not made by RunConfig
            backend.retry_start_requests(retry.model_copy(update={"unreachable_budget": 0.0}))
        await backend.describe()
    except MagpieError as exc:
        await backend.aclose()
        raise _as_judge(exc) from None
    except BaseException:
        await backend.aclose()
        raise
    return backend


def _pick_default(names: list[str]) -> str | None:
    matches = sorted(
        n for n in names if n == DEFAULT_OLLAMA_MODEL or n.startswith(DEFAULT_OLLAMA_MODEL + ":")
    )
    return matches[0] if matches else None


async def _choose_embedded(spec: BackendSpec) -> BackendChoice:
    if spec.model and not looks_like_gguf(spec.model):
        raise UsageError(f"--backend embedded needs a .gguf file as --model, not {spec.model!r}")
    b = _embedded(spec)
    return BackendChoice(b, f"backend embedded: {b.model} (llama.cpp, in process)")


async def _choose_openai(spec: BackendSpec) -> BackendChoice:
    b = _openai(spec)
    return BackendChoice(b, f"backend openai: {spec.model or 'the first model served'} at {b.host}")


async def _choose_ollama(spec: BackendSpec) -> BackendChoice:
    if looks_like_gguf(spec.model):
        raise UsageError(
            f"--backend ollama takes an Ollama model name, not a file: {spec.model!r} "
            "(use --backend embedded for a .gguf file)"
        )
    b = _ollama(spec, spec.model or DEFAULT_OLLAMA_MODEL)
    return BackendChoice(b, f"backend ollama: {b.model} at {b.host}")


async def _choose_auto(spec: BackendSpec) -> BackendChoice:
    """``--backend auto``: embedded for a GGUF file, Ollama for a model name, and
    with neither Ollama's default model if the server is up and has it, else
    the embedded model."""
    if looks_like_gguf(spec.model):
        b = _embedded(spec)
        return BackendChoice(b, f"backend embedded: {b.model} (--model is a GGUF file)")
    if spec.model:
        b = _ollama(spec, spec.model)
        return BackendChoice(
            b, f"backend ollama: {b.model} at {b.host} (--model names an Ollama model)"
        )
    from magpie.backends.ollama import OllamaBackend

    probe = OllamaBackend(DEFAULT_OLLAMA_MODEL, spec.hosts[0], timeout=PROBE_TIMEOUT)
    # A busy server (503) is asked again; a refused connection or no answer
    # within the probe's time means no Ollama here.
    policy = (spec.retry or RetryPolicy(max_retries=0)).model_copy(
        update={"unreachable_budget": 0.0}
    )
    try:
        try:
            models = await call_with_retry(
                lambda: asyncio.wait_for(probe.list_models(), PROBE_TIMEOUT * 2), policy
            )
            names = [m["model"] for m in models]
        except BackendError as exc:
            if not exc.retryable:  # something else answers there: not an Ollama
                why = f"Ollama is not reachable at {probe.host}"
            else:  # an Ollama that stays busy is there: never swap the model silently
                raise BackendUnavailable(
                    f"Ollama at {probe.host} answers but stays busy ({exc})",
                    fix="rerun when it has room (or raise OLLAMA_MAX_QUEUE), pass --model to "
                    "name its model, or --backend embedded for the embedded model",
                ) from None
        except (BackendUnavailable, asyncio.TimeoutError, Exception):  # noqa: BLE001
            why = f"Ollama is not reachable at {probe.host}"
        else:
            chosen = _pick_default(names)
            if chosen:
                b = _ollama(spec, chosen)
                return BackendChoice(b, f"backend ollama: {chosen} at {b.host} (Ollama is running)")
            why = (
                f"Ollama at {probe.host} has no {DEFAULT_OLLAMA_MODEL} "
                f"(pass --model with one of: {', '.join(sorted(names)) or 'none pulled'})"
            )
    finally:
        await probe.aclose()
    b = _embedded(spec)
    return BackendChoice(b, f"backend embedded: {b.model}, because {why}")


#: ``--backend NAME`` -> how its backend is opened, and the line on why.
CHOOSERS: dict[str, Callable[[BackendSpec], Awaitable[BackendChoice]]] = {
    "auto": _choose_auto,
    "embedded": _choose_embedded,
    "ollama": _choose_ollama,
    "openai": _choose_openai,
}


async def choose_backend(
    spec: BackendSpec, on_retry: Callable[[str], None] | None = None
) -> BackendChoice:
    """Open the backend the spec asks for (``auto``: Ollama if it is up), each of
    its start-up requests retried by ``spec.retry`` (``on_retry`` counts them),
    as :func:`open_backend` does: a backend gets its policy where it is opened,
    so no caller retries a start-up request of its own."""
    choice = await CHOOSERS[spec.backend](spec)
    choice.backend.retry_start_requests(spec.retry, on_retry)
    return choice
