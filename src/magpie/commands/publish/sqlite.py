"""``magpie export --format sqlite -o data.db``: a browsable copy for Datasette.

Tables (built with sqlite-utils):

* ``records``: one row a record (``id`` the primary key): the texts, model,
  template, system, seed, time, turns, the judge's response score, and the
  preference pair's answers and scores; full-text search (FTS5) on
  ``instruction`` and ``response``;
* ``messages``: ``record_id``, ``position``, ``role``, ``content``;
* ``judge_tags``: ``record_id`` and every judge tag (``other_categories`` as JSON);
* ``rejects`` (with ``--rejects``): index, reason, stage, detail, instruction, response.

``datasette data.db`` opens it as it is.  Records stream in batches; the file
is built under a temporary name beside the target and renamed into place.
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
from magpie.store.atomic import AtomicFile
from magpie.store.jsonl import read_objects, read_records
from magpie.store.targets import check_target, same_file

_BATCH = 1_000


def _record_row(rec: Record) -> dict[str, Any]:
    pair = rec.preference()
    return {
        "id": rec.id,
        "index": rec.index,
        "instruction": rec.instruction,
        "response": rec.response,
        "model": rec.model,
        "backend": rec.backend,
        "template": rec.template,
        "system": rec.system,
        "system_name": rec.system_name,
        "seed": rec.seed,
        "created_at": rec.created_at.isoformat(),
        "turns": rec.turns,
        "response_score": rec.judge.response_score if rec.judge else None,
        "chosen": pair.chosen if pair else None,
        "rejected": pair.rejected if pair else None,
        "score_chosen": pair.score_chosen if pair else None,
        "score_rejected": pair.score_rejected if pair else None,
    }


def _judge_row(rec: Record) -> dict[str, Any] | None:
    if rec.judge is None:
        return None
    tags = rec.judge.model_dump()
    tags["other_categories"] = json.dumps(tags.get("other_categories") or [])
    return {"record_id": rec.id, **{k: v for k, v in tags.items() if not isinstance(v, dict)}}


def _reject_rows(path: Path) -> Iterator[dict[str, Any]]:
    from magpie.commands.publish.columns import reject_row

    return (reject_row(obj) for obj in read_objects(path) if obj is not None)


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
    if same_file(dst_p, str(src_p)):
        raise UsageError(f"output {dst_p} is the input: pick another --output")
    check_target(dst_p, "output", overwrite=overwrite)
    rej_p = Path(rejects).expanduser() if rejects else None
    if rej_p is not None and not rej_p.is_file():
        raise UsageError(f"--rejects {rej_p} not found")
    n = n_rej = 0
    try:
        target = AtomicFile(dst_p)
    except OSError as exc:
        raise UsageError(f"output {dst_p} is not writable ({exc.strerror})") from None
    with target:  # renamed into place when the block ends, removed on an error
        db = sqlite_utils.Database(target.tmp_path)
        try:
            records, messages, judge = db["records"], db["messages"], db["judge_tags"]
            recs = read_records(src_p)
            while batch := list(islice(recs, _BATCH)):
                n += len(batch)
                records.insert_all((_record_row(r) for r in batch), pk="id", alter=True)  # type: ignore[union-attr]
                messages.insert_all(  # type: ignore[union-attr]
                    (
                        {"record_id": r.id, "position": i, "role": m.role, "content": m.content}
                        for r in batch
                        for i, m in enumerate(r.messages)
                    ),
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
