"""The Parquet schema of records and rejects, derived from the record model, and
rows in it (and back).

The schema is not kept by hand: :func:`arrow_type` walks the annotations of
:class:`~magpie.records.Record` (and the models inside it), so a field added
to a record is a column of every export, or :func:`arrow_type` raises on a
type it cannot place and the export tests fail.  The mapping:

* ``str`` and string ``Literal`` -> string; ``int`` -> int64; ``float`` ->
  float64; ``bool`` -> bool; ``datetime`` -> string (ISO 8601, as in the JSONL);
* a model -> a struct of its fields; a model that allows extra keys
  (``Record``, ``JudgeTags``) also gets ``extra_fields``: its other keys as
  JSON text (null when there are none), so nothing a line holds is dropped;
* ``list[X]`` -> a list of X; a type with a ``dict`` inside (free keys, such
  as ``turn_generations``) -> JSON text;
* ``X | None`` -> X, nullable.

A fixed schema (not one inferred per batch), so that every shard of a streamed
export has the same columns whatever fields its records leave empty.  The
preference columns (``chosen``, ``rejected`` and their scores) are present only
when some record holds a pair: TRL reserves those names, and a column of nulls
would confuse its format check as schema 1 did.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel

from magpie.commands.publish.fields import EXTRA, omitted
from magpie.commands.publish.fields import allows_extra as _allows_extra
from magpie.commands.publish.fields import has_dict as _has_dict
from magpie.commands.publish.fields import is_model as _is_model
from magpie.commands.publish.fields import optional as _optional
from magpie.records import Record

#: The columns of a rejects file line before the record's own.
#: (the rejects file's keys ``reject_reason``, ``reject_stage``, ``reject_detail``).
REJECT_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("reason", pa.string()),
    ("stage", pa.string()),
    ("detail", pa.string()),
)
REJECT_KEYS: tuple[str, ...] = ("reject_reason", "reject_stage", "reject_detail")


class JsonText:
    """Marks a value stored as JSON text (a type with free keys inside)."""


def arrow_type(annotation: Any, path: str = "", omit: frozenset[str] = frozenset()) -> pa.DataType:
    """The Parquet type of a field's annotation (see the module doc); ``path``
    names the field (``messages.reasoning_content``) for ``omit``."""
    if _has_dict(annotation):
        return pa.string()
    annotation = _optional(annotation)
    origin = get_origin(annotation)
    if origin is Literal:
        kinds = {type(a) for a in get_args(annotation)}
        if kinds == {str}:
            return pa.string()
        if kinds == {int}:
            return pa.int64()
        raise TypeError(f"no Parquet type for {annotation!r}")
    if origin is list:
        return pa.list_(arrow_type(get_args(annotation)[0], path, omit))
    if _is_model(annotation):
        return pa.struct(model_fields(annotation, path, omit))
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation in simple:
        return simple[annotation]
    if annotation is datetime:
        return pa.string()
    raise TypeError(f"no Parquet type for {annotation!r}: teach magpie.commands.publish.columns")


def model_fields(
    model: type[BaseModel], path: str = "", omit: frozenset[str] = frozenset()
) -> list[tuple[str, pa.DataType]]:
    """The Parquet fields of a model: one per field, in order (but those named
    in ``omit``), and ``extra_fields`` for a model that allows other keys."""
    fields = []
    for name, f in model.model_fields.items():
        sub = f"{path}.{name}" if path else name
        if sub not in omit:
            fields.append((name, arrow_type(f.annotation, sub, omit)))
    if _allows_extra(model):
        fields.append((EXTRA, pa.string()))
    return fields


def record_schema(pairs: bool, reasoning: bool = True) -> pa.Schema:
    """The records' schema; ``pairs``: with the preference columns;
    ``reasoning``: with the messages' ``reasoning_content``."""
    return pa.schema(model_fields(Record, omit=omitted(pairs, reasoning)))


_RECORD_FIELDS = model_fields(Record)


def rejects_schema() -> pa.Schema:
    """The schema of a rejects file's lines: why, then every record column
    (null where the attempt ended before there was a record)."""
    fields = [(name, t) for name, t in _RECORD_FIELDS if name != "index"]
    return pa.schema([("index", pa.int64()), *REJECT_FIELDS, *fields])


def _value(annotation: Any, value: Any) -> Any:
    """``value`` (of ``annotation``) as a value of :func:`arrow_type`'s type."""
    if value is None:
        return None
    if _has_dict(annotation):
        return json.dumps(_jsonable(value), ensure_ascii=False)
    annotation = _optional(annotation)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return [_value(item, v) for v in value]
    if _is_model(annotation):
        return model_row(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def model_row(obj: BaseModel) -> dict[str, Any]:
    """A model instance as a row (a struct value) of :func:`model_fields`."""
    cls = type(obj)
    row = {name: _value(f.annotation, getattr(obj, name)) for name, f in cls.model_fields.items()}
    if _allows_extra(cls):
        extra = obj.model_extra or {}
        row[EXTRA] = json.dumps(_jsonable(extra), ensure_ascii=False) if extra else None
    return row


def record_row(rec: Record) -> dict[str, Any]:
    """One record as a row of :func:`record_schema` (a schema that leaves a
    column out ignores its key: it is empty in every record, see :func:`omitted`)."""
    return model_row(rec)


def reject_row(line: dict[str, Any]) -> dict[str, Any]:
    """One line of a ``--rejects`` file as a row of :func:`rejects_schema`.

    A line that holds a whole record (rejected after its response) fills every
    record column; an earlier rejection fills the columns it has a plain value
    for (index, instruction, model, seed); every other key of the line (dedup's
    ``duplicate_of``, ...) goes to ``extra_fields``: nothing is dropped."""
    data = {k: v for k, v in line.items() if k not in REJECT_KEYS}
    try:
        row = model_row(Record.model_validate(data))
    except ValueError:
        row, rest = {}, {}
        for key, value in data.items():
            t = _RECORD_TYPES.get(key)
            if t is not None and _fits(t, value):
                row[key] = value
            else:
                rest[key] = value
        row[EXTRA] = json.dumps(rest, ensure_ascii=False) if rest else None
    for (column, _), key in zip(REJECT_FIELDS, REJECT_KEYS, strict=True):
        value = line.get(key)
        row[column] = value if isinstance(value, str) else None
    return row


_RECORD_TYPES = dict(_RECORD_FIELDS)


def _fits(t: pa.DataType, value: Any) -> bool:
    """Whether a JSON scalar ``value`` is a value of the primitive type ``t``."""
    if pa.types.is_string(t):
        return isinstance(value, str)
    if pa.types.is_integer(t):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(t):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_boolean(t):
        return isinstance(value, bool)
    return False


def _from_value(annotation: Any, value: Any) -> Any:
    """The inverse of :func:`_value`: JSON-ready data of the record's shape."""
    if value is None:
        return None
    if _has_dict(annotation):
        return json.loads(value)
    annotation = _optional(annotation)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return [_from_value(item, v) for v in value]
    if _is_model(annotation):
        return row_data(annotation, value)
    return value


def row_data(model: type[BaseModel], row: dict[str, Any]) -> dict[str, Any]:
    """A row of :func:`model_fields` back as the model's data (for
    ``model.model_validate``): the inverse of :func:`model_row`."""
    data = {
        name: _from_value(f.annotation, row.get(name)) for name, f in model.model_fields.items()
    }
    if _allows_extra(model) and row.get(EXTRA):
        data.update(json.loads(row[EXTRA]))
    return data


def record_from_row(row: dict[str, Any]) -> Record:
    """A row of :func:`record_schema` (as ``datasets`` or pyarrow read it) back
    as a record."""
    return Record.model_validate(row_data(Record, row))
