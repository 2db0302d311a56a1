"""Pre-query templates: the registry of families, detection and Jinja derivation."""

from magpie.templates.registry import (
    TemplateFamily,
    families,
    family_names,
    get_family,
    load_family_file,
)
from magpie.templates.resolve import PreQuery, detect_family, drop_bos, resolve_pre_query

__all__ = [
    "PreQuery",
    "TemplateFamily",
    "detect_family",
    "drop_bos",
    "families",
    "family_names",
    "get_family",
    "load_family_file",
    "resolve_pre_query",
]
