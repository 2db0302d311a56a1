"""Backends: one small contract (:class:`Backend`), several implementations.

Implementations are imported lazily so that ``import magpie`` stays cheap and
the embedded backend's llama.cpp is only loaded when it is used.
"""

from magpie.backends.base import Backend, Completion, ModelInfo, Sampling

__all__ = ["Backend", "Completion", "ModelInfo", "Sampling"]
