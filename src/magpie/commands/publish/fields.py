"""The record's shape, read from the record model's annotations (no pyarrow):
what the exports derive their columns, keys and documentation from.

:mod:`magpie.commands.publish.columns` builds the Parquet schema on it; the
dataset card's field table (:func:`field_docs`) and the JSONL formats' account
of what they hold (:data:`magpie.commands.export.NO_PLACE`) read it too, so a
field added to :class:`~magpie.records.Record` reaches them all by itself.
"""

from __future__ import annotations

import types
from datetime import datetime
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from magpie.records import PAIR_FIELDS, Message, Record

#: The key of a model's other keys (models with ``extra="allow"``), as JSON text.
EXTRA = "extra_fields"


def optional(annotation: Any) -> Any:
    """``X`` of ``X | None``; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no Parquet type for the union {annotation!r}")
        return args[0]
    return annotation


def has_dict(annotation: Any) -> bool:
    """Whether a type has free keys inside (stored as JSON text in Parquet)."""
    annotation = optional(annotation)
    if get_origin(annotation) is dict or annotation is dict:
        return True
    return any(has_dict(a) for a in get_args(annotation) if get_origin(annotation) is list)


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def allows_extra(model: type[BaseModel]) -> bool:
    return model.model_config.get("extra") == "allow"


#: The record's fields that hold a conversation (a list of messages):
#: ``messages``, and the pair's ``chosen`` and ``rejected``.
MESSAGE_LISTS: tuple[str, ...] = tuple(
    name
    for name, f in Record.model_fields.items()
    if get_origin(optional(f.annotation)) is list and get_args(optional(f.annotation)) == (Message,)
)

#: Fields a record's line leaves out when unset (its serializers), which an
#: export leaves out too when no record has them: TRL reserves the pair's names
#: (a column of nulls would confuse its format check as schema 1 did), and a
#: chat template may take a null ``reasoning_content`` for one that is there.
PAIR_COLUMNS = frozenset(PAIR_FIELDS)
REASONING_COLUMNS = frozenset(f"{name}.reasoning_content" for name in MESSAGE_LISTS)


def omitted(pairs: bool, reasoning: bool) -> frozenset[str]:
    """The columns of an export whose records hold no pair (``pairs`` False)
    or no message reasoning (``reasoning`` False)."""
    return (frozenset() if pairs else PAIR_COLUMNS) | (
        frozenset() if reasoning else REASONING_COLUMNS
    )


def has_reasoning(rec: Record) -> bool:
    """Whether a message of the record (in any of its conversations) holds
    ``reasoning_content``."""
    return any(
        m.reasoning_content is not None for name in MESSAGE_LISTS for m in getattr(rec, name) or ()
    )


def type_text(
    annotation: Any, path: str = "", omit: frozenset[str] = frozenset(), parquet: bool = True
) -> str:
    """A field's type in words, for the dataset card's field table: as a
    Parquet column (``parquet``; free-key types as JSON text, a model's other
    keys in ``extra_fields``) or as a JSONL key."""
    if parquet and has_dict(annotation):
        return "JSON text" + (" or null" if optional(annotation) is not annotation else "")
    inner = optional(annotation)
    null = " or null" if inner is not annotation else ""
    origin = get_origin(inner)
    if origin is Literal:
        kinds = {type(a) for a in get_args(inner)}
        text = "string" if kinds == {str} else "int" if kinds == {int} else "value"
    elif origin is list:
        text = "list of " + type_text(get_args(inner)[0], path, omit, parquet)
    elif origin is dict:
        text = "object of " + type_text(get_args(inner)[1], path, omit, parquet)
    elif is_model(inner):
        names = [n for n in inner.model_fields if f"{path}.{n}" not in omit]
        names += [EXTRA] if parquet and allows_extra(inner) else []
        text = "{" + ", ".join(names) + "}"
    elif inner is datetime:
        text = "string (ISO 8601)"
    else:
        words = {str: "string", int: "int", float: "float", bool: "bool"}
        if inner not in words:
            raise TypeError(f"no words for the type {inner!r}: teach type_text")
        text = words[inner]
    return text + null


#: The ``extra_fields`` column's documentation (a model that allows other keys).
EXTRA_DOC = (
    "the keys a line holds beyond this schema (written by a later magpie or another "
    "tool), as JSON text; null when there are none"
)


def field_docs(pairs: bool, reasoning: bool, parquet: bool = True) -> list[tuple[str, str, str]]:
    """``(name, type, meaning)`` of every column of :func:`~magpie.commands.publish.columns.record_schema` (or
    every key of a JSONL record, ``parquet`` False), derived from the record
    model: the meaning is the field's description."""
    omit = omitted(pairs, reasoning)
    rows = [
        (name, type_text(f.annotation, name, omit, parquet), f.description or "")
        for name, f in Record.model_fields.items()
        if name not in omit
    ]
    if parquet:
        rows.append((EXTRA, "JSON text or null", EXTRA_DOC))
    return rows
