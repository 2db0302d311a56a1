"""Where the Ollama server is: the host URL as the official client resolves it,
checked, and the credentials a URL may carry."""

from __future__ import annotations

import base64
import os
import urllib.parse

from magpie.errors import UsageError

DEFAULT_HOST = "http://127.0.0.1:11434"


def resolve_host(host: str | None) -> str:
    """The host URL as the ollama client resolves it (argument, OLLAMA_HOST, default)."""
    from ollama._client import _parse_host

    return _parse_host(host or os.getenv("OLLAMA_HOST"))


def validate_host(host: str, flag: str = "--host") -> str:
    """Check that ``host`` looks like a URL or host[:port] that the ollama
    client takes; return the resolved URL (``flag``: the option that named it)."""
    bad = UsageError(f"{flag} {host!r} is not a URL: use e.g. {DEFAULT_HOST}")
    if (
        not host
        or any(c.isspace() for c in host)
        or "://" in host
        and not host.startswith(("http://", "https://"))
    ):
        raise bad
    try:
        url = resolve_host(host)
    except Exception:  # noqa: BLE001 - the client's parser raises various errors
        raise bad from None
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    if path == "/api" or path.startswith("/api/"):
        base = url[: url.index(path)]
        raise UsageError(
            f"{flag} {host!r} ends in an API path ({path}): give the server's base URL, "
            f"such as {base}"
        )
    return url


def host_credentials(host: str | None) -> tuple[str | None, dict[str, str]]:
    """``host`` without ``user:password@``, and the Basic authorization header
    for them (the ollama client drops credentials from a URL; a server behind
    an authenticating proxy needs them sent)."""
    if not host or "@" not in host:
        return host, {}
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "", host
    netloc, slash, tail = rest.partition("/")
    if "@" not in netloc:
        return host, {}
    userinfo, _, hostport = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(
        f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    ).decode()
    bare = (f"{scheme}://" if sep else "") + hostport + (slash + tail if slash else "")
    return bare, {"Authorization": f"Basic {token}"}
