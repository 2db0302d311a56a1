"""What the settings know of each ``--backend`` choice: a table, so that no
check asks for a backend by its name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _ollama_url(host: str, flag: str = "--host") -> object:
    from magpie.backends.ollama import validate_host

    return validate_host(host, flag)


def _openai_url(host: str, flag: str = "--host") -> object:
    from magpie.backends.openai import normalize_host

    return normalize_host(host, flag)


@dataclass(frozen=True)
class BackendTraits:
    """What the settings know of a ``--backend`` choice, so that no check asks
    for a backend by its name."""

    #: A ``--model`` that looks like a .gguf is a file it loads in process
    #: (checked before any work starts).
    loads_gguf: bool = False
    #: A model named by a path is a served model's id (llama-server names its
    #: model by the GGUF path it loaded, ``/v1/models``), not a file.
    model_ids_are_paths: bool = False
    #: It can serve the embedding model of semantic dedup.
    embeds: bool = False
    #: ``OLLAMA_HOST`` names its server (an OpenAI-compatible one reads
    #: ``OPENAI_BASE_URL`` instead).
    reads_ollama_host: bool = True
    #: It takes ``n`` samples per request (``--samples-per-request``).
    takes_n: bool = False
    #: Checks one of its host URLs by its client's rules (exit 2 on a bad one;
    #: the second argument is the option that named it): the ollama client's
    #: (``embedded`` has no server: its ``--host`` is the judge's Ollama), or an
    #: OpenAI-compatible base URL's (``/v1`` or a proxy's path, https).
    check_url: Callable[[str, str], object] = _ollama_url
    #: The context is set per run (``--num-ctx``): Ollama loads the model with
    #: it, the embedded backend makes its contexts with it; an OpenAI-compatible
    #: server fixes its own when it starts.
    sets_context: bool = True


BACKENDS: dict[str, BackendTraits] = {
    "auto": BackendTraits(loads_gguf=True),
    "embedded": BackendTraits(loads_gguf=True),
    "ollama": BackendTraits(embeds=True),
    "openai": BackendTraits(
        model_ids_are_paths=True,
        embeds=True,
        reads_ollama_host=False,
        takes_n=True,
        check_url=_openai_url,
        sets_context=False,
    ),
}
#: Semantic dedup's embedding server when the generator cannot host it.
DEFAULT_EMBEDDER = "ollama"
