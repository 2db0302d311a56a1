"""The Ollama backend: the official ``ollama`` client, and aiohttp for generation.

The two requests of every pair (streamed /api/generate and /api/chat) go as
NDJSON over one :class:`~magpie.backends.http.AioSession` per backend
(keep-alive pool, C HTTP parser): the same bodies, headers and errors as
through ``ollama.AsyncClient``, whose httpx stack costs several times the CPU
per streamed request.  Everything else (show, tags, version, embed), and
generation with ``direct_stream=False``, goes through ``ollama.AsyncClient`` on
httpx's own transport: the official client stays the reference the direct path
is held to (a parity test), so its httpx client is not replaced.

- :mod:`~magpie.backends.ollama.hosts`: the host URL, checked; credentials in it.
- :mod:`~magpie.backends.ollama.show`: what /api/show, /api/tags, /api/version say.
- :mod:`~magpie.backends.ollama.generate`: request options; a streamed reply
  gathered into a Completion.
- :mod:`~magpie.backends.ollama.backend`: :class:`OllamaBackend`, the contract.
"""

from magpie.backends.ollama.backend import DEFAULT_TIMEOUT, OllamaBackend
from magpie.backends.ollama.hosts import (
    DEFAULT_HOST,
    host_credentials,
    resolve_host,
    validate_host,
)
from magpie.backends.ollama.show import (
    RENDER_SINCE,
    renders_templates,
    stops_from_parameters,
    system_from_modelfile,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_TIMEOUT",
    "RENDER_SINCE",
    "OllamaBackend",
    "host_credentials",
    "renders_templates",
    "resolve_host",
    "stops_from_parameters",
    "system_from_modelfile",
    "validate_host",
]
