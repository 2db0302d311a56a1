"""Text rendered into a template: the one test of whether it would forge a turn.

A special token (``<|im_start|>``, the template's own) or a role header
(``User:`` at the start of a line) inside a text that magpie renders into a
prompt would open a turn the template did not: the model would read a forged
user or system turn.  :func:`template_reason` is the test, for every such
text:

* model-written text (the instruction, each answer, each follow-up, what a
  judge reads) is rejected with its reason (``special_token``,
  ``role_leak``; :mod:`magpie.pipeline.stages.clean`);
* user-given text is refused before any work (exit 2) by
  :func:`check_prompt_text`: the system prompt (``--system``, a preset, each
  entry of a weighted ``[systems]`` set), each persona and topic and their
  templates (``--persona-template``, ``--topic-template``), the judge's
  system prompt (``--judge-prompt``).  A template among them also passes
  :func:`check_placeholders`: a ``{name}`` it does not know would go into
  every prompt as literal text.

Before the model's template is known, a user text is checked against the
markup tokens of every known family (:func:`markup_tokens`); once it is
resolved, again against the template's own (its stop strings and special
tokens), which names plain-word headers too (``ASSISTANT`` for vicuna).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence

from magpie.errors import UsageError
from magpie.templates.registry import families

#: Reasons :func:`template_reason` gives.
SPECIAL_TOKEN = "special_token"
ROLE_LEAK = "role_leak"

# A role header leaked as plain text: "User:" / "### Assistant:" at the start of a
# line, or a line that is only a role word ("assistant" after a lost header).
_ROLE_LEAK_RE = re.compile(
    r"(?im)^\s*(?:#{1,4}\s*)?(?:user|assistant)\s*:|^\s*(?:user|assistant|system|model)\s*$"
)
_TOKEN_RE = re.compile(r"<\|[A-Za-z_][A-Za-z0-9_]*\|>")
#: A placeholder of a text template: ``{name}``.
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@functools.lru_cache(maxsize=64)
def _tokens_re(tokens: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for a template's special strings and any ``<|name|>`` token."""
    parts = [re.escape(t) for t in sorted(set(tokens), key=len, reverse=True) if t]
    return re.compile("|".join([*parts, _TOKEN_RE.pattern]))


def find_forgery(text: str, forbidden: Iterable[str]) -> tuple[str, str] | None:
    """``(reason, what was found)`` when ``text`` may not be rendered into a
    template (``forbidden``: the template's own special strings), else None."""
    found = _tokens_re(tuple(forbidden)).search(text)
    if found is not None:
        return SPECIAL_TOKEN, found.group(0)
    found = _ROLE_LEAK_RE.search(text)
    if found is not None:
        return ROLE_LEAK, found.group(0).strip()
    return None


def template_reason(text: str, forbidden: list[str]) -> str | None:
    """``special_token`` or ``role_leak`` when ``text`` may not be rendered into
    a template (``forbidden``: the template's own special strings), else None."""
    found = find_forgery(text, forbidden)
    return found[0] if found is not None else None


#: Special tokens of some families that open no turn (a reasoning block):
#: refused in a user text only for the model whose template has them.
_NO_TURN = frozenset({"<think>", "</think>"})


@functools.lru_cache(maxsize=1)
def markup_tokens() -> tuple[str, ...]:
    """The special tokens, BOS and stop strings of every known family that are
    markup (``<|im_start|>``, ``[INST]``, ``<start_of_turn>``), not plain words
    (vicuna's ``ASSISTANT``): what no user text may hold, whatever the model."""
    seen: dict[str, None] = {}
    for fam in families().values():
        for tok in [*fam.special_tokens, fam.bos, *fam.stop]:
            if tok and tok not in _NO_TURN and re.search(r"[^\w\s]", tok):
                seen[tok] = None
    return tuple(seen)


def check_prompt_text(what: str, text: str, forbidden: Iterable[str] = ()) -> str:
    """Refuse a user-given ``text`` that reaches a prompt and would forge a
    turn in it (exit 2); ``what`` names it in the message (``--system``,
    ``--personas FILE: persona 3``); ``forbidden``: the model's template's own
    special strings, when it is known.  Returns ``text``."""
    found = find_forgery(text, (*markup_tokens(), *forbidden))
    if found is not None:
        reason, piece = found
        held = (
            f"the template token {piece!r}"
            if reason == SPECIAL_TOKEN
            else f"a role header ({piece!r})"
        )
        raise UsageError(
            f"{what} holds {held}; remove it: text magpie puts into a prompt may not "
            "open a turn of its own"
        )
    return text


def check_placeholders(
    what: str, template: str, known: Sequence[str], required: Sequence[str] = ()
) -> str:
    """Refuse a text template (``--persona-template``) that lacks a ``required``
    placeholder or names one it does not know (exit 2).  Returns ``template``."""
    names = list(dict.fromkeys(_PLACEHOLDER_RE.findall(template)))
    slots = " and ".join("{" + k + "}" for k in known)
    for name in required:
        if name not in names:
            others = [k for k in known if k != name]
            also = (
                f" (and may contain {', '.join('{' + k + '}' for k in others)})" if others else ""
            )
            raise UsageError(f"{what} must contain {{{name}}}{also}: {template!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"{what} names the placeholder {{{unknown[0]}}}, which it does not know "
            f"(it knows {slots}): {template[:200]!r}"
        )
    return template


def fill_placeholders(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{name}`` of ``values`` filled in, in one pass: a
    value that holds a placeholder (a persona written ``{system}``) stays as
    it is, never filled in turn."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)
