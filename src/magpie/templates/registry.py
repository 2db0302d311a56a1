"""The registry of template families, kept as data in ``families.toml``."""

from __future__ import annotations

import functools
import sys
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from magpie.errors import TemplateError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SYSTEM_SLOT = "{system}"


class TemplateFamily(BaseModel):
    """One chat-template family: pre-query strings, stop strings, detection markers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    bos: str = ""
    pre_query: str = Field(min_length=1)
    system_pre_query: str | None = Field(None, min_length=1)
    user_header: str | None = None
    after_user: str | None = None
    after_assistant: str | None = None
    stop: list[str]
    markers: list[str] = Field(default_factory=list)
    special_tokens: list[str] = Field(default_factory=list)

    def render(self, system: str | None = None) -> str:
        """The pre-query text, with ``system`` in the family's system slot if given."""
        if system is None:
            return self.pre_query
        if self.system_pre_query is None:
            raise TemplateError(
                f"template family {self.name!r} has no system slot; drop --system "
                "or pick a template with one"
            )
        return self.system_pre_query.replace(SYSTEM_SLOT, system)

    @property
    def forbidden_tokens(self) -> list[str]:
        """Strings that mark a dirty instruction: special tokens plus the stop strings."""
        seen: dict[str, None] = {}
        for tok in [*self.special_tokens, *self.stop, self.bos]:
            if tok:
                seen[tok] = None
        return list(seen)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[str, TemplateFamily], tuple[str, ...]]:
    raw = tomllib.loads(
        resources.files("magpie.templates").joinpath("families.toml").read_text("utf-8")
    )
    families = {name: TemplateFamily(name=name, **spec) for name, spec in raw["families"].items()}
    return families, tuple(raw["detect_order"])


def families() -> dict[str, TemplateFamily]:
    """All known families by name, in registry order."""
    return dict(_load()[0])


def known_special_tokens() -> list[str]:
    """The special tokens of every family (for text whose template is unknown:
    ``magpie filter`` refuses them in any message)."""
    seen: dict[str, None] = {}
    for fam in families().values():
        for tok in [*fam.special_tokens, fam.bos]:
            if tok:
                seen[tok] = None
    return list(seen)


def detect_order() -> tuple[str, ...]:
    return _load()[1]


def family_names() -> list[str]:
    return list(_load()[0])


def get_family(name: str) -> TemplateFamily:
    """Look a family up by name or alias (case-insensitive)."""
    fams = _load()[0]
    key = name.strip().lower()
    if key in fams:
        return fams[key]
    for fam in fams.values():
        if key in (a.lower() for a in fam.aliases):
            return fam
    raise TemplateError(
        f"unknown template {name!r}; known families: {', '.join(fams)} "
        "(or 'auto', or a template file path)"
    )


def load_family_file(path: str | Path) -> TemplateFamily:
    """Read a user template file (TOML with the same keys as a registry family)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"template file not found: {p}") from None
    except IsADirectoryError:
        raise UsageError(f"template file is a directory: {p}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"template file {p} is not valid TOML: {exc}") from None
    data.setdefault("name", p.stem)
    try:
        return TemplateFamily(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "?"
        raise UsageError(f"template file {p}: {loc}: {err['msg']}") from None
