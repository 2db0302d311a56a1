"""Steering by personas and topics (``--personas``, ``--topics``).

One persona and/or one topic is drawn per record, reproducibly from the run
seed and the attempt index, and written into the pre-query's system block
through a template, so the instruction the model writes is one that person
would ask, or one about that topic.  The record carries what was drawn.

Rendering: the pre-query of each base system prompt (the run's, or each of a
weighted ``[systems]`` set) is rendered once with sentinels in place of the
persona and the topic; a draw substitutes them.  ``magpie.commands.generate``
checks once per base that the substitution gives exactly what the template
renders for a real item, so a template that alters the system text is refused
rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from magpie.backends.base import Backend, ModelInfo
from magpie.errors import UsageError
from magpie.templates import PreQuery
from magpie.templates.injection import check_placeholders, check_prompt_text, fill_placeholders

Kind = Literal["persona", "topic"]

#: The system prompt a persona or topic is added to when the run has none and
#: the model has no default one (Ollama SYSTEM).
DEFAULT_SYSTEM = "You are a helpful AI assistant."

#: Chosen by measurement on the embedded default (``python benchmarks/diversity.py
#: --num 80 --persona-templates``, README "Diversity"): of three candidates it
#: kept the most attempts (79%) and, read by hand, wrote the most instructions
#: that are a user's request (16 of the first 25, against 15 and 14), at a
#: distinct-2 within noise of the best (0.838 against 0.815 and 0.847).
DEFAULT_TEMPLATES: dict[Kind, str] = {
    "persona": "{system} The user is {persona}.",
    "topic": "{system} The user asks you a question about {topic}.",
}

_SENTINEL: dict[Kind, str] = {"persona": "MAGPIEPERSONA7f3c", "topic": "MAGPIETOPIC7f3c"}
#: At most this many items in a list; longer lists are a mistake (a dataset
#: passed as a persona file) more often than a wish.
MAX_ITEMS = 1_000_000
MAX_ITEM_CHARS = 2000


@dataclass(frozen=True)
class SteerList:
    """The items of ``--personas`` or ``--topics``, and where they came from."""

    kind: Kind
    items: tuple[str, ...]
    #: A built-in set's name, or the file's path.
    source: str
    #: sha256 of the items (one per line): a top-up checks it is the same list.
    digest: str

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "count": len(self.items), "sha256": self.digest}


def builtin_names(kind: Kind) -> list[str]:
    """The built-in sets of one kind (``src/magpie/prompts/<kind>s/*.txt``)."""
    folder = resources.files("magpie.prompts").joinpath(f"{kind}s")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_list(spec: str, kind: Kind) -> SteerList:
    """A built-in set by name, a text file (one item per line; blank lines and
    lines starting with ``#`` are skipped) or a JSONL file (``.jsonl``: one
    object per line with a ``persona``/``topic`` field, or a JSON string)."""
    spec = spec.strip()
    flag = f"--{kind}s"
    if spec in builtin_names(kind):
        text = resources.files("magpie.prompts").joinpath(f"{kind}s/{spec}.txt").read_text("utf-8")
        items = _lines(text)
        source = f"builtin:{spec}"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            known = ", ".join(builtin_names(kind))
            raise UsageError(
                f"{flag} {spec}: no such file and no built-in set of that name (built-in: {known})"
            )
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{flag} {path}: cannot read it ({exc})") from None
        items = _jsonl(text, kind, path) if path.suffix == ".jsonl" else _lines(text)
        source = str(path)
    if not items:
        raise UsageError(f"{flag} {spec}: holds no {kind}")
    if len(items) > MAX_ITEMS:
        raise UsageError(f"{flag} {spec}: {len(items)} {kind}s, more than {MAX_ITEMS}")
    for i, item in enumerate(items, 1):
        if len(item) > MAX_ITEM_CHARS:
            raise UsageError(
                f"{flag} {spec}: {kind} {i} is {len(item)} characters long "
                f"(at most {MAX_ITEM_CHARS})"
            )
    digest = hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()
    return SteerList(kind, tuple(items), source, digest)


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _jsonl(text: str, kind: Kind, path: Path) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--{kind}s {path}: line {n} is not JSON ({exc.msg})") from None
        if isinstance(value, dict):
            value = value.get(kind)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(
                f"--{kind}s {path}: line {n} has no {kind!r} text (an object with a "
                f"{kind!r} field, or a JSON string)"
            )
        out.append(" ".join(value.split()))
    return out


def check_template(template: str, kind: Kind) -> str:
    """A ``--persona-template``/``--topic-template``: it must name its slot,
    may name ``{system}`` and nothing else, and may not forge a turn (the one
    check of a user text that reaches a prompt)."""
    what = f"--{kind}-template"
    check_placeholders(what, template, known=(kind, "system"), required=(kind,))
    return check_prompt_text(what, template)


def _draw(seed: int, index: int, kind: Kind, n: int) -> int:
    h = hashlib.blake2b(f"{seed}:{index}:{kind}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") % n


@dataclass
class Draw:
    """What an attempt was made with: its pre-query and the steering drawn."""

    pre_query: PreQuery
    system_name: str | None = None
    persona: str | None = None
    topic: str | None = None


@dataclass
class Steering:
    """The persona and topic lists of a run and how they enter the system block."""

    personas: SteerList | None = None
    topics: SteerList | None = None
    templates: dict[Kind, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    #: Pre-queries rendered with the sentinels, by base (None: the run's own
    #: pre-query; else a weighted system's name).  Filled by :meth:`add_base`.
    bases: dict[str | None, PreQuery] = field(default_factory=dict)

    @property
    def kinds(self) -> list[Kind]:
        return [k for k in ("persona", "topic") if self.list_of(k) is not None]  # type: ignore[misc]

    def list_of(self, kind: Kind) -> SteerList | None:
        return self.personas if kind == "persona" else self.topics

    def system_text(self, base: str | None, values: dict[Kind, str]) -> str:
        """The system block: each drawn item through its template, after ``base``.

        A template that names ``{system}`` places the base itself; the others are
        appended after it (a persona and a topic both: persona first)."""
        text = (base or DEFAULT_SYSTEM).strip()
        if text and text[-1] not in ".!?:;":
            text += "."  # "... trained by Hugging Face" + " The user is ..."
        for kind in self.kinds:
            tpl = self.templates[kind]
            # One pass: a value that holds "{system}" (or "{topic}") stays as it is.
            filled = fill_placeholders(tpl, {kind: values[kind], "system": text})
            text = filled if "{system}" in tpl else f"{text} {filled}"
        return text.strip()

    def sentinel_system(self, base: str | None) -> str:
        return self.system_text(base, {k: _SENTINEL[k] for k in self.kinds})

    def first_values(self) -> dict[Kind, str]:
        return {k: self.list_of(k).items[0] for k in self.kinds}  # type: ignore[union-attr]

    def add_base(self, key: str | None, rendered: PreQuery) -> None:
        """Keep the pre-query rendered from :meth:`sentinel_system`; each sentinel
        must appear in its text exactly once (else the template has no system
        slot, or repeats the system text)."""
        for kind in self.kinds:
            n = rendered.text.count(_SENTINEL[kind])
            if n != 1:
                what = (
                    "has no system slot (or drops the system prompt)"
                    if n == 0
                    else f"renders the system prompt {n} times"
                )
                raise UsageError(f"--{kind}s: the template {rendered.name!r} {what}")
        self.bases[key] = rendered

    def check_items(self, forbidden: Iterable[str] = ()) -> None:
        """Refuse an item, or a template, that holds a special token (any
        known family's, and the model's ``forbidden``) or a role header: the
        one check of a user text that reaches a prompt."""
        marks = tuple(forbidden)
        for kind in self.kinds:
            lst = self.list_of(kind)
            assert lst is not None
            check_prompt_text(f"--{kind}-template", self.templates[kind], marks)
            for i, item in enumerate(lst.items, 1):
                check_prompt_text(f"--{kind}s {lst.source}: {kind} {i}", item, marks)

    def substitute(self, key: str | None, values: dict[Kind, str]) -> PreQuery:
        """The pre-query of base ``key`` with the drawn items in its system block."""
        pq = self.bases[key]
        text, system = pq.text, pq.system
        for kind, value in values.items():
            text = text.replace(_SENTINEL[kind], value)
            if system is not None:
                system = system.replace(_SENTINEL[kind], value)
        return pq.model_copy(update={"text": text, "system": system})

    def draw(self, seed: int, index: int, key: str | None, system_name: str | None) -> Draw:
        values: dict[Kind, str] = {}
        for kind in self.kinds:
            lst = self.list_of(kind)
            assert lst is not None
            values[kind] = lst.items[_draw(seed, index, kind, len(lst.items))]
        return Draw(
            self.substitute(key, values),
            system_name,
            persona=values.get("persona"),
            topic=values.get("topic"),
        )

    def describe(self) -> dict[str, object]:
        """For the manifest: which lists, and the templates used."""
        out: dict[str, object] = {}
        for kind in self.kinds:
            lst = self.list_of(kind)
            assert lst is not None
            out[f"{kind}s"] = {**lst.describe(), "template": self.templates[kind]}
        return out


async def render_bases(
    steering: Steering,
    template: str,
    backend: Backend,
    info: ModelInfo,
    bases: list[tuple[str | None, str | None]],
    forbidden: list[str],
) -> Steering:
    """Render the sentinel pre-query of each base system prompt ``(key, text)``
    (``text`` None: the model's default, else :data:`DEFAULT_SYSTEM`), and check
    once per base that substituting the first items gives exactly what the
    template renders for them (a template that alters the system text is refused)."""
    from magpie.templates.rendered import aresolve_pre_query

    steering.check_items(forbidden)
    values = steering.first_values()
    for key, text in bases:
        base = text if text is not None else await default_system(template, backend, info)
        rendered = await aresolve_pre_query(template, backend, info, steering.sentinel_system(base))
        steering.add_base(key, rendered)
        real = await aresolve_pre_query(template, backend, info, steering.system_text(base, values))
        if steering.substitute(key, values).text != real.text:
            kinds = " and ".join(f"--{k}s" for k in steering.kinds)
            raise UsageError(
                f"{kinds}: the template {rendered.name!r} does not render the system prompt "
                "verbatim, so a persona or topic cannot be placed in it exactly; pick another "
                "--template"
            )
    return steering


async def default_system(template: str, backend: Backend, info: ModelInfo) -> str | None:
    """The system prompt the template renders when given none: Ollama's SYSTEM,
    or the default a chat template writes itself (SmolLM2's GGUF template has
    one), read off by rendering a sentinel system and none and comparing."""
    from magpie.templates.rendered import aresolve_pre_query

    if info.system:
        return info.system
    probe = _SENTINEL["persona"]
    with_probe = (await aresolve_pre_query(template, backend, info, probe)).text
    plain = (await aresolve_pre_query(template, backend, info, None)).text
    if with_probe.count(probe) != 1:
        return None
    before, after = with_probe.split(probe)
    if plain.startswith(before) and plain.endswith(after) and len(plain) > len(before + after):
        found = plain[len(before) : len(plain) - len(after)].strip()
        return found or None
    return None
