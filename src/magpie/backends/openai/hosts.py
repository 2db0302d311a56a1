"""Where the OpenAI-compatible server is: its base URL, checked."""

from __future__ import annotations

import os

import httpx

from magpie.errors import UsageError

#: ``vllm serve``'s default address (llama-server uses :8080, LM Studio :1234).
DEFAULT_HOST = "http://127.0.0.1:8000"


def normalize_host(host: str, flag: str = "--host") -> str:
    """``host[:port]`` or a URL, as the base URL requests are built on
    (``flag``: the option that named it, for the error).

    A scheme is added when missing; a trailing ``/`` or ``/v1`` (how the
    ``openai`` client's ``base_url`` is usually written) is dropped.  Any other
    path stays (a proxy's prefix: ``https://host/api/v1`` is ``https://host/api``);
    a query, a fragment or a port out of range is refused.
    """
    text = (host or "").strip()
    bad = UsageError(f"{flag} {host!r} is not a URL: use e.g. {DEFAULT_HOST}")
    if not text or any(c.isspace() for c in text):
        raise bad
    if "://" not in text:
        text = f"http://{text}"
    elif not text.startswith(("http://", "https://")):
        raise bad
    text = text.rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    try:
        url = httpx.URL(text)
    except Exception:  # noqa: BLE001 - httpx raises several kinds
        raise bad from None
    if not url.host or url.query or url.fragment or "?" in text or "#" in text:
        raise bad
    try:
        port = url.port
    except Exception:  # noqa: BLE001 - httpx raises several kinds
        raise bad from None
    if port is not None and not 0 < port < 65536:
        raise bad
    return text


def resolve_host(host: str | None) -> str:
    """The base URL: ``host``, else ``OPENAI_BASE_URL``, else :data:`DEFAULT_HOST`."""
    return normalize_host(host or os.getenv("OPENAI_BASE_URL") or DEFAULT_HOST)
