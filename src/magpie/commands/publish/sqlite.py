"""``magpie export --format sqlite -o data.db``: a browsable copy for Datasette.

Tables (built with sqlite-utils):

* ``records``: one row a record (``id`` the primary key), a column for every
  key of its line (derived from the record model, so a new field is a new
  column; nested values such as ``messages``, ``judge``, ``guard``, ``chosen``
  as JSON text), and the judge's ``response_score`` beside them; full-text
  search (FTS5) on ``instruction`` and ``response``;
* ``messages``: ``record_id``, ``position`` and every key of the message
  (``role``, ``content``, ``reasoning_content`` where there is one);
* ``judge_tags``: ``record_id`` and every judge tag (``other_categories`` as JSON);
* ``rejects`` (with ``--rejects``): every key of each line (``reason``,
  ``stage``, ``detail`` for its ``reject_*`` keys), the whole record of a pair
  rejected after its response.

``datasette data.db`` opens it as it is.  Records stream in batches; the file
is built under a temporary name beside the target and renamed into place,
under the target's lock; it is never the input or the rejects file it reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from magpie.errors import UsageError
from magpie.records import Record
from magpie.store.atomic import AtomicOutput
from magpie.store.jsonl import read_objects, read_records
from magpie.store.targets import Targets

_BATCH = 1_000


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as one row: nested values as JSON text (Datasette shows
    them as JSON)."""
    return {
        k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
        for k, v in data.items()
    }


def _record_row(rec: Record) -> dict[str, Any]:
    """Every key of the record's line (derived from the record model: a new
    field is a new column), and the judge's response score beside them."""
    row = _flat(rec.model_dump(mode="json"))
    row["response_score"] = rec.judge.response_score if rec.judge else None
    return row


def _message_rows(rec: Record) -> Iterator[dict[str, Any]]:
    for i, m in enumerate(rec.messages):
        yield {"record_id": rec.id, "position": i, **m.model_dump(mode="json")}


def _judge_row(rec: Record) -> dict[str, Any] | None:
    if rec.judge is None:
        return None
    return {"record_id": rec.id, **_flat(rec.judge.model_dump(mode="json"))}


#: A rejects line's own keys, and their columns.
_REJECT_COLUMNS = {"reject_reason": "reason", "reject_stage": "stage", "reject_detail": "detail"}


def _reject_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Every key of each rejects line (a whole record where it holds one)."""
    for obj in read_objects(path):
        if obj is not None:
            yield _flat({_REJECT_COLUMNS.get(k, k): v for k, v in obj.items()})


@dataclass
class SqliteExport:
    path: Path
    records: int
    rejects: int


def export_sqlite(
    src: Path | str,
    dst: Path | str,
    *,
    rejects: Path | str | None = None,
    overwrite: bool = False,
) -> SqliteExport:
    """Write the SQLite file ``dst`` from the magpie JSONL ``src`` (see the module doc)."""
    try:
        import sqlite_utils
    except ImportError as exc:
        raise UsageError(
            f"--format sqlite needs sqlite-utils ({exc}): pip install 'magpie[sqlite]'"
        ) from None
    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    if not src_p.is_file():
        raise UsageError(
            f"input {src_p} not found" if not src_p.exists() else f"input {src_p} is not a file"
        )
    rej_p = Path(rejects).expanduser() if rejects else None
    if rej_p is not None and not rej_p.is_file():
        raise UsageError(f"--rejects {rej_p} not found")
    targets = Targets(overwrite=overwrite)
    targets.read("input", src_p)
    targets.read("--rejects", rej_p)
    targets.replace("output", dst_p)
    targets.check()
    n = n_rej = 0
    # Renamed into place when the block ends, removed on an error.
    with targets.claim(), AtomicOutput(targets["output"]) as target:
        db = sqlite_utils.Database(target.tmp_path)
        try:
            records, messages, judge = db["records"], db["messages"], db["judge_tags"]
            recs = read_records(src_p)
            while batch := list(islice(recs, _BATCH)):
                n += len(batch)
                records.insert_all((_record_row(r) for r in batch), pk="id", alter=True)  # type: ignore[union-attr]
                messages.insert_all(  # type: ignore[union-attr]
                    (row for r in batch for row in _message_rows(r)),
                    pk=("record_id", "position"),
                    foreign_keys=[("record_id", "records", "id")],
                    alter=True,
                )
                rows = [row for r in batch if (row := _judge_row(r)) is not None]
                if rows:
                    judge.insert_all(rows, pk="record_id", alter=True)  # type: ignore[union-attr]
            if not records.exists():
                records.create({"id": str, "instruction": str, "response": str}, pk="id")  # type: ignore[union-attr]
            records.enable_fts(["instruction", "response"], fts_version="FTS5")  # type: ignore[union-attr]
            if judge.exists():
                judge.add_foreign_key("record_id", "records", "id")  # type: ignore[union-attr]
            if rej_p is not None:
                table = db["rejects"]
                rows_iter = _reject_rows(rej_p)
                while batch_r := list(islice(rows_iter, _BATCH)):
                    n_rej += len(batch_r)
                    table.insert_all(batch_r, alter=True)  # type: ignore[union-attr]
                if not table.exists():
                    table.create({"index": int, "reason": str, "instruction": str})  # type: ignore[union-attr]
            db.conn.commit()
        finally:
            db.close()
    return SqliteExport(dst_p, n, n_rej)
