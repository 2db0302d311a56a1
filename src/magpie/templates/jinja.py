"""Derive a pre-query template from a model's own Jinja chat template.

GGUF files carry the Hugging Face chat template in ``tokenizer.chat_template``.
Rendering it around a sentinel user message and cutting at the sentinel gives the
exact text the model sees before a user's words: default system block, BOS and
all.  This is how models no registry knows (Qwen3, new releases) work without a
hand-written template.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from magpie.errors import TemplateError

SENTINEL = "MAGPIE_SENTINEL_7f3a9c"

#: Token-looking strings: <|im_end|>, <end_of_turn>, [INST], <<SYS>>.
_TOKEN_RE = re.compile(r"<\|[^<>|\s]+\|>|<[a-z][a-z0-9_]*>|</s>|<s>|\[/?INST\]|<</?SYS>>")


def _raise(message: str) -> None:
    raise TemplateError(f"the model's chat template refused to render: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def render_chat_template(
    chat_template: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render a Hugging Face-style Jinja chat template, as transformers does."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=None,
            documents=None,
        )
    except TemplateError:
        raise
    except JinjaError as exc:
        raise TemplateError(f"cannot render the model's chat template: {exc}") from None


def split_at_sentinel(
    chat_template: str,
    *,
    system: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> tuple[str, str]:
    """Return (text before the user message, text after it up to the reply)."""
    messages = [{"role": "user", "content": SENTINEL}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = render_chat_template(chat_template, messages, bos_token=bos_token, eos_token=eos_token)
    idx = text.find(SENTINEL)
    if idx < 0:
        raise TemplateError("the model's chat template does not render the user message")
    return text[:idx], text[idx + len(SENTINEL) :]


def split_at_sentinel_messages(
    chat_template: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """What the template renders before a user message that follows ``messages``."""
    full = [*messages, {"role": "user", "content": SENTINEL}]
    text = render_chat_template(chat_template, full, bos_token=bos_token, eos_token=eos_token)
    idx = text.find(SENTINEL)
    if idx < 0:
        raise TemplateError("the model's chat template does not render the user message")
    return text[:idx]


def template_tokens(*texts: str) -> list[str]:
    """Special-token-looking strings in ``texts``, in order of appearance, unique."""
    seen: dict[str, None] = {}
    for text in texts:
        for m in _TOKEN_RE.finditer(text):
            seen[m.group(0)] = None
    return list(seen)


def derive_stop(prefix: str, suffix: str, *, eos_token: str = "") -> list[str]:
    """Stop strings for an instruction request, from a rendered template's two halves.

    The tokens that end the user turn and start the next one (found in both
    halves), plus EOS.  A template with no token-like strings (Vicuna style) stops
    at the first line of the text that follows the user message ("ASSISTANT:").
    """
    stops = template_tokens(suffix, prefix)
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    if not stops:
        first = next((ln.strip() for ln in suffix.splitlines() if ln.strip()), "")
        if first:
            stops.append(first)
    return stops
