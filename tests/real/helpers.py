"""Reading what a real-server run wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Chat-template tokens of the families the real servers render (ChatML, Llama 3).
LEAK_RE = re.compile(
    r"<\|(?:im_start|im_end|start_header_id|end_header_id|eot_id|begin_of_text)\|>"
)


def records(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` ([] before the run created it)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest(path: Path) -> dict[str, Any]:
    return json.loads(Path(f"{path}.manifest.json").read_text())


def check_records(path: Path, n: int) -> list[dict[str, Any]]:
    """Exactly ``n`` valid records with unique ids, no leaked template tokens."""
    from magpie.records import Record

    recs = records(path)
    assert len(recs) == n, f"{len(recs)} records, expected {n}"
    for r in recs:
        Record.model_validate(r)
        for m in r["messages"]:
            assert not LEAK_RE.search(m["content"]), m["content"]
            assert m["content"].strip()
    assert len({r["id"] for r in recs}) == n
    return recs
