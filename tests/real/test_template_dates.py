"""A template that writes today's date (``{{ currentDate }}``, as gpt-oss's
does), made with ``ollama create`` on the real Ollama: the top-up of a file
made on another day goes on, its records keep ids that do not depend on the
day, and a pre-query that differs in more than the date is still refused.

The real server renders today only (no fake clock here), so "yesterday" is
the file a run of yesterday leaves: its manifest's pre-query holds
yesterday's date.  tests/test_template_dates.py runs the same on the double,
whose clock a test moves; tests/real/test_ollama_protocol.py holds the
double's rendering to this server's."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from pathlib import Path

from magpie_cli import run_magpie
from real_servers import RealOllama

from magpie.records import record_id
from magpie.store.manifest import manifest_path
from magpie.templates.dates import undated

from .conftest import DATED_MODEL
from .helpers import check_records, manifest

ARGS = [
    "--model",
    DATED_MODEL,
    "--instruction-max-tokens",
    "48",
    "--response-max-tokens",
    "48",
    "--keep-truncated",
]


def _generate(srv: RealOllama, out: Path, n: int, *extra: str):  # type: ignore[no-untyped-def]
    return run_magpie(
        "generate", "-n", str(n), "--host", srv.url, "-o", str(out), *ARGS, *extra, timeout=900
    )


def _rewrite(out: Path, old: str, new: str) -> None:
    """The manifest with ``old`` written as ``new`` in its pre-query and dates."""
    path = manifest_path(out)
    data = json.loads(path.read_text())
    data["template"]["text"] = data["template"]["text"].replace(old, new)
    data["template"]["dates"] = [new if d == old else d for d in data["template"]["dates"]]
    for run in data["runs"]:
        run["template_dates"] = [new if d == old else d for d in run["template_dates"] or []]
    path.write_text(json.dumps(data, indent=2))


def test_top_up_of_a_file_made_yesterday(dated_model: RealOllama, tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    res = _generate(dated_model, out, 1, "--seed", "5")
    assert res.returncode == 0, res.stderr
    template = manifest(out)["template"]
    assert template["source"] == "ollama-render"
    found = re.search(r"Current date: (\d{4}-\d{2}-\d{2})<\|im_end\|>", template["text"])
    assert found, template["text"]
    today = found.group(1)
    # The server's own day (its local time), as magpie found it in the render.
    assert template["dates"] == [today]
    assert today in {str(date.today()), str(date.today() - timedelta(days=1))}

    yesterday = str(date.fromisoformat(today) - timedelta(days=1))
    _rewrite(out, today, yesterday)  # as yesterday's run left it
    res = _generate(dated_model, out, 2)
    assert res.returncode == 0, res.stderr
    assert "holds 1 records; generating 1 more" in res.stderr
    recs = check_records(out, 2)
    man = manifest(out)
    assert [r["template_dates"] for r in man["runs"]] == [[yesterday], [today]]
    assert today in man["template"]["text"] and yesterday not in man["template"]["text"]
    # The ids hash the pre-query with its date masked: the same on every day.
    masked = undated(man["template"]["text"], [today])
    assert masked == undated(man["template"]["text"].replace(today, yesterday), [yesterday])
    assert [r["id"] for r in recs] == [record_id(DATED_MODEL, masked, 5, r["index"]) for r in recs]

    # Anything but the date that differs is another pre-query: refused, untouched.
    _rewrite(out, today, yesterday)
    path = manifest_path(out)
    data = json.loads(path.read_text())
    data["template"]["text"] = data["template"]["text"].replace("Current date", "Date")
    path.write_text(json.dumps(data))
    before = out.read_bytes()
    res = _generate(dated_model, out, 3)
    assert res.returncode == 2, res.stderr
    assert "a different pre-query text" in res.stderr
    assert out.read_bytes() == before
