"""The exact pre-query from the server itself: render a sentinel, cut there.

A server that can render its model's chat template on request (Ollama's
``/api/chat`` with ``_debug_render_only``, llama-server's ``/apply-template``:
:meth:`magpie.backends.base.Backend.render_chat`) gives the text the model sees
before a user's words, its default system prompt included, for any model it
serves, known family or not.  Rendering ``[user: SENTINEL]`` and cutting at the
sentinel is the pre-query; the text after it (the end of the user turn and the
assistant header) gives the stop strings; ``[user: Q, assistant: A, user:
SENTINEL]`` gives how a conversation continues (``--turns``).  Marker matching
(:func:`magpie.templates.resolve.resolve_pre_query`) is the fallback for servers
that cannot render.
"""

from __future__ import annotations

from magpie.backends.base import Backend, ModelInfo
from magpie.errors import TemplateError
from magpie.templates import jinja
from magpie.templates.dates import date_formats, find_dates
from magpie.templates.registry import families
from magpie.templates.resolve import PreQuery, detect_family, drop_bos, resolve_pre_query

SENTINEL = jinja.SENTINEL
#: Stand-ins for a first exchange, to learn how the template continues one.
_Q = ("MAGPIE_Q1_5b1e", "MAGPIE_Q2_5b1e")
_A = ("MAGPIE_A1_5b1e", "MAGPIE_A2_5b1e")


def _cut(rendered: str) -> tuple[str, str]:
    idx = rendered.find(SENTINEL)
    if idx < 0:
        raise TemplateError("the server's rendering of the chat template lost the user message")
    return rendered[:idx], rendered[idx + len(SENTINEL) :]


def _messages(system: str | None, *pairs: tuple[str, str]) -> list[dict[str, str]]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*msgs, {"role": "user", "content": SENTINEL}]


async def render_pre_query(
    backend: Backend, info: ModelInfo, system: str | None = None
) -> PreQuery | None:
    """The pre-query as the server renders it (None: the server cannot render).

    ``system`` None renders the model's own default system prompt (Ollama's
    ``SYSTEM``), as a chat request without a system message gets it."""
    rendered = await backend.render_chat(_messages(system))
    if rendered is None:
        return None
    prefix, suffix = _cut(rendered)
    if not prefix.strip():
        raise TemplateError(
            f"the chat template of {info.model!r} renders nothing before the user message; "
            "pass --template with a family (`magpie templates list`)"
        )
    fam = detect_family(info.template or rendered)
    stop = jinja.derive_stop(prefix, suffix, eos_token=info.eos_token or "")
    stop += [s for s in info.stop if s not in stop]
    forbidden = [*jinja.template_tokens(prefix, suffix), *stop]
    if fam is not None:
        stop += [s for s in fam.stop if s not in stop]
        forbidden += fam.forbidden_tokens
    text = drop_bos(prefix, info.bos_token or "") if info.adds_bos else prefix
    pq = PreQuery(
        name=_name(text, fam.name if fam else None, backend.render_source),
        source=backend.render_source,  # type: ignore[arg-type]
        text=text,
        stop=stop,
        system=system if system is not None else info.system,
        forbidden=[t for t in dict.fromkeys(forbidden) if t],
        adds_bos=info.adds_bos,
        bos_token=info.bos_token or "",
        eos_token=info.eos_token or "",
        # Today's date, where the template writes it (gpt-oss's `currentDate`).
        dates=find_dates(text, date_formats(info.template)),
    )
    await _learn_conversation(backend, pq, prefix, system)
    return pq


def _name(text: str, family: str | None, source: str) -> str:
    """A registry family's name when the rendering is exactly its pre-query
    (top-ups of files made by marker matching stay the same template)."""
    for fam in families().values():
        for candidate in (fam.pre_query, drop_bos(fam.pre_query, fam.bos)):
            if candidate == text:
                return fam.name
    return family or source


async def _learn_conversation(
    backend: Backend, pq: PreQuery, prefix: str, system: str | None
) -> None:
    """Fill ``after_user``/``after_assistant`` from a rendered exchange, checked
    against a rendering of two; a template that renders conversations some
    other way leaves them unset (``--turns`` then says so)."""
    one = await backend.render_chat(_messages(system, (_Q[0], _A[0])))
    if one is None:
        return
    conv, _ = _cut(one)
    if not conv.startswith(prefix + _Q[0]) or _A[0] not in conv:
        return
    after_user, rest = conv[len(prefix) + len(_Q[0]) :].split(_A[0], 1)
    two = await backend.render_chat(_messages(system, (_Q[0], _A[0]), (_Q[1], _A[1])))
    if two is None:
        return
    expected = prefix + _Q[0] + after_user + _A[0] + rest + _Q[1] + after_user + _A[1] + rest
    if _cut(two)[0] != expected:
        return
    pq.after_user, pq.after_assistant, pq.user_header = after_user, rest, ""


async def aresolve_pre_query(
    spec: str, backend: Backend, info: ModelInfo, system: str | None = None
) -> PreQuery:
    """``--template``: ``auto`` asks the server to render the model's template
    (:func:`render_pre_query`) and falls back to marker matching or the GGUF's
    Jinja template (:func:`resolve_pre_query`); a name or file is used as is."""
    if spec.strip().lower() == "auto":
        pq = await render_pre_query(backend, info, system)
        if pq is not None:
            return pq
    return resolve_pre_query(spec, info, system)
