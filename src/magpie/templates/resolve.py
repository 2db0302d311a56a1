"""Turn ``--template NAME|auto|FILE`` plus a model description into the exact
pre-query text and stop strings of a run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from magpie.backends.base import ModelInfo
from magpie.errors import TemplateError
from magpie.templates import jinja
from magpie.templates.dates import date_formats, find_dates, undated
from magpie.templates.registry import (
    TemplateFamily,
    detect_order,
    families,
    family_names,
    get_family,
    load_family_file,
)

BOS_STRINGS = ("<|begin_of_text|>", "<bos>", "<s>")


class PreQuery(BaseModel):
    """The resolved pre-query template of a run: what is sent, and how to stop."""

    name: str
    #: How the text was found: a registry family or file, Ollama's template
    #: matched by markers ("ollama-auto"), the GGUF's Jinja template, or the
    #: server's own rendering ("ollama-render": Ollama's ``_debug_render_only``;
    #: "apply-template": llama-server's ``/apply-template``).
    source: Literal[
        "registry", "file", "ollama-auto", "gguf-jinja", "ollama-render", "apply-template"
    ]
    #: Exactly the raw prompt sent for an instruction (BOS handled, system included).
    text: str
    stop: list[str]
    system: str | None = None
    #: Strings that make an instruction dirty (special tokens, role headers).
    forbidden: list[str] = Field(default_factory=list)
    user_header: str | None = None
    after_user: str | None = None
    after_assistant: str | None = None
    #: For templates derived from a GGUF: the Jinja source, to render follow-ups exactly.
    jinja: str | None = Field(default=None, repr=False)
    bos_token: str = ""
    eos_token: str = ""
    adds_bos: bool = True
    #: The dates the template rendered into ``text`` (Ollama's ``currentDate``,
    #: a Jinja template's ``strftime_now``: :mod:`magpie.templates.dates`):
    #: they change from day to day, the template does not.
    dates: list[str] = Field(default_factory=list)

    @property
    def undated(self) -> str:
        """``text`` with its :attr:`dates` masked: the same on every day (the
        record id hashes it)."""
        return undated(self.text, self.dates)

    @property
    def multi_turn(self) -> bool:
        return self.jinja is not None or None not in (
            self.user_header,
            self.after_user,
            self.after_assistant,
        )

    def conversation(self, messages: list[dict[str, str]]) -> str:
        """The raw prompt that asks for the next user turn after ``messages``
        (user/assistant pairs): what the template renders before the next user text."""
        if self.jinja is not None:
            full = [*messages]
            if self.system is not None:
                full.insert(0, {"role": "system", "content": self.system})
            text = jinja.split_at_sentinel_messages(
                self.jinja, full, bos_token=self.bos_token, eos_token=self.eos_token
            )
            return drop_bos(text, self.bos_token) if self.adds_bos else text
        if not self.multi_turn:
            raise TemplateError(
                f"template {self.name!r} does not say how to render a conversation "
                "(after_user, after_assistant, user_header): --turns needs them"
            )
        parts = [self.text]
        for i in range(0, len(messages) - 1, 2):
            parts += [messages[i]["content"], self.after_user or "", messages[i + 1]["content"]]
            parts += [self.after_assistant or "", self.user_header or ""]
        return "".join(parts)


def drop_bos(text: str, bos: str = "") -> str:
    """Drop a leading BOS token string (and one space after it).

    Ollama's tokenizer adds BOS itself; sending it again doubles it.  ``bos`` is
    the family's own BOS string; the common ones are always recognised.
    """
    for tok in (bos, *BOS_STRINGS):
        if tok and text.startswith(tok):
            rest = text[len(tok) :]
            return rest[1:] if rest.startswith(" ") else rest
    return text


_ROLE_SLOT = re.compile(r"\{\{-?\s*\.Role\s*-?\}\}")


def detect_family(template_text: str) -> TemplateFamily | None:
    """Pick the registry family whose markers all appear in a chat template.

    A Go template that writes each role through a slot (Ollama's stock phi-3:
    ``<|{{ .Role }}|>``) is read with the slot filled in as well."""
    if _ROLE_SLOT.search(template_text):
        template_text += "\n" + "\n".join(
            _ROLE_SLOT.sub(role, template_text) for role in ("user", "assistant", "system")
        )
    fams = families()
    for name in detect_order():
        fam = fams[name]
        if fam.markers and all(m in template_text for m in fam.markers):
            return fam
    return None


def _canonical_name(fam: TemplateFamily, text: str, adds_bos: bool) -> str:
    for other in [fam, *families().values()]:
        if (
            other.stop == fam.stop
            and (drop_bos(other.pre_query, other.bos) if adds_bos else other.pre_query) == text
        ):
            return other.name
    return fam.name


def _from_family(
    fam: TemplateFamily,
    source: Literal["registry", "file", "ollama-auto"],
    system: str | None,
    adds_bos: bool,
) -> PreQuery:
    text = fam.render(system)
    if adds_bos:
        text = drop_bos(text, fam.bos)
    return PreQuery(
        name=fam.name,
        source=source,
        text=text,
        stop=list(fam.stop),
        system=system,
        forbidden=fam.forbidden_tokens,
        user_header=fam.user_header,
        after_user=fam.after_user,
        after_assistant=fam.after_assistant,
        adds_bos=adds_bos,
    )


def _from_jinja(info: ModelInfo, system: str | None) -> PreQuery:
    assert info.template is not None
    bos, eos = info.bos_token or "", info.eos_token or ""
    prefix, suffix = jinja.split_at_sentinel(
        info.template, system=system, bos_token=bos, eos_token=eos
    )
    if not prefix.strip():
        raise TemplateError(
            "the model's chat template renders nothing before the user message; "
            f"pass --template with one of: {', '.join(family_names())}"
        )
    stop = jinja.derive_stop(prefix, suffix, eos_token=eos)
    fam = detect_family(info.template)
    forbidden = list(dict.fromkeys([*jinja.template_tokens(prefix, suffix), *stop]))
    if fam is not None:
        stop = list(dict.fromkeys([*stop, *fam.stop]))
        forbidden = list(dict.fromkeys([*forbidden, *fam.forbidden_tokens]))
    text = prefix
    if info.adds_bos:
        text = drop_bos(text, bos)
    forbidden = [t for t in forbidden if t]
    # The user-turn header is the last turn's opening: the text after the last
    # end-of-turn token in the prefix.
    header = prefix
    for tok in stop:
        if tok in header:
            header = header.rsplit(tok, 1)[-1]
    return PreQuery(
        name=f"gguf-jinja:{fam.name}" if fam else "gguf-jinja",
        source="gguf-jinja",
        text=text,
        stop=stop,
        system=system,
        forbidden=forbidden,
        user_header=header.lstrip("\n") or None,
        jinja=info.template,
        bos_token=bos,
        eos_token=eos,
        adds_bos=info.adds_bos,
        dates=find_dates(text, date_formats(info.template)),
    )


def resolve_pre_query(spec: str, info: ModelInfo, system: str | None = None) -> PreQuery:
    """Resolve ``--template`` (a family name, ``auto`` or a TOML file path).

    ``auto``: a Jinja template (GGUF) is rendered around a sentinel; a Go template
    (Ollama) is matched to a family by its markers, and the model's default
    system prompt (Modelfile ``SYSTEM``) is included as Ollama would render it.
    """
    spec = spec.strip()
    if spec.lower() == "auto":
        if info.template and info.template_kind == "jinja":
            return _from_jinja(info, system)
        if info.template:
            fam = detect_family(info.template)
            if fam is not None:
                eff_system = system if system is not None else info.system
                if eff_system is not None and fam.system_pre_query is None:
                    eff_system = None
                pq = _from_family(fam, "ollama-auto", eff_system, info.adds_bos)
                if system is None:
                    # Name it after the registry family whose default text it is
                    # (chatml + Qwen's SYSTEM renders exactly qwen2.5's pre-query).
                    pq.name = _canonical_name(fam, pq.text, info.adds_bos)
                return pq
        what = (
            "its chat template matches no known family"
            if info.template
            else ("it has no chat template")
        )
        raise TemplateError(
            f"cannot detect the template of model {info.model!r}: {what}; pass "
            f"--template with one of: {', '.join(family_names())} (or a template file)"
        )
    path = Path(spec).expanduser()
    if spec.endswith((".toml", ".tml")) or path.is_file() or "/" in spec:
        return _from_family(load_family_file(path), "file", system, info.adds_bos)
    return _from_family(get_family(spec), "registry", system, info.adds_bos)
