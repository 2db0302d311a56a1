"""What ``/api/show``, ``/api/tags`` and ``/api/version`` say, read: the
modelfile's ``SYSTEM``, the ``stop`` parameters, whether a model is pulled,
whether the server renders templates on request."""

from __future__ import annotations

import json
import re

_SYSTEM_RE = [
    re.compile(r'^SYSTEM\s+"""(.*?)"""', re.S | re.M),
    re.compile(r'^SYSTEM\s+"((?:[^"\\]|\\.)*)"\s*$', re.M),
    re.compile(r"^SYSTEM\s+(.+)$", re.M),
]


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


_STOP_RE = re.compile(r'^stop\s+(?:"((?:[^"\\]|\\.)*)"|(\S.*?))\s*$', re.M)


def stops_from_parameters(parameters: str | None) -> list[str]:
    """The ``stop`` values of ``/api/show``'s ``parameters`` text."""
    out: list[str] = []
    for m in _STOP_RE.finditer(parameters or ""):
        value = m.group(1)
        if value is not None:
            value = json.loads(f'"{value}"') if "\\" in value else value
        else:
            value = m.group(2)
        if value and value not in out:
            out.append(value)
    return out


#: The first Ollama that answers ``_debug_render_only`` (ollama/ollama 8de1da4).
RENDER_SINCE = (0, 11, 5)


def renders_templates(version: str) -> bool:
    """Whether an Ollama of ``version`` renders templates on request; a
    development build ("0.0.0", unparsable) is taken to be new."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        return True
    parts = tuple(int(x) for x in m.groups())
    return parts == (0, 0, 0) or parts >= RENDER_SINCE


def has_model(names: list[str], model: str) -> bool:
    """Whether ``model`` is among Ollama's ``names`` (``x`` is ``x:latest``)."""

    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return norm(model) in {norm(n) for n in names}
