"""magpie: instruction-tuning datasets from local LLMs with the Magpie method.

The library does the work; the ``magpie`` command is a thin layer over it::

    from magpie import RunConfig, generate
    result = generate(RunConfig(num=10, output="data.jsonl"))
    print(result.stats.summary())

Heavy modules (pydantic models, backends, llama.cpp) load on first use, so
``import magpie`` and ``magpie --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "magpie.settings",
    "build_config": "magpie.settings",
    "generate": "magpie.commands.generate",
    "agenerate": "magpie.commands.generate",
    "prepare": "magpie.commands.generate",
    "RunResult": "magpie.commands.generate",
    "Pipeline": "magpie.pipeline.scheduler",
    "PipelineSettings": "magpie.pipeline.scheduler",
    "Record": "magpie.records",
    "Rejection": "magpie.records",
    "Sampling": "magpie.backends.base",
    "Backend": "magpie.backends.base",
    "OllamaBackend": "magpie.backends.ollama",
    "EmbeddedBackend": "magpie.backends.llamacpp.model",
    "BatchedEmbeddedBackend": "magpie.backends.llamacpp.batch",
    "resolve_pre_query": "magpie.templates",
    "get_family": "magpie.templates",
    "ExitStatus": "magpie.errors",
    "MagpieError": "magpie.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'magpie' has no attribute {name!r}")
