"""``magpie export --format sqlite`` (issue 14): the real sqlite-utils reads the
tables and runs a full-text query; the real Datasette serves the file as is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from batch_helpers import MODEL, preference_engine
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, build_models

sqlite_utils = pytest.importorskip("sqlite_utils")


#: Slow tier (tests/support/tiers.py): loads a model, trains or drives a browser.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sqlite")
    data, rejects = d / "data.jsonl", d / "data.rejects.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], preference_engine())) as srv:
        proc = run_magpie(
            "generate", "-n", "5", "--model", MODEL, "--host", srv.url, "--seed", "5",
            "--responses", "3", "--judge", "same", "--min-response-score", "9",
            "--rejects", str(rejects), "-o", str(data),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return data, rejects


def _export(data: Path, rejects: Path, db: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_magpie(
        "export", str(data), "--format", "sqlite", "-o", str(db), "--rejects", str(rejects), *extra
    )


def test_tables_and_full_text_search(run: tuple[Path, Path], tmp_path: Path) -> None:
    data, rejects = run
    db_path = tmp_path / "data.db"
    proc = _export(data, rejects, db_path)
    assert proc.returncode == 0, proc.stderr
    assert f"datasette {db_path}" in proc.stderr and proc.stdout == ""
    records = [json.loads(line) for line in data.read_text().splitlines()]
    db = sqlite_utils.Database(db_path)
    assert {"records", "messages", "judge_tags", "rejects"} <= set(db.table_names())
    assert db["records"].count == len(records)
    assert db["messages"].count == sum(len(r["messages"]) for r in records)
    assert db["judge_tags"].count == len(records)
    assert db["rejects"].count == len(rejects.read_text().splitlines())
    first = records[0]
    row = db["records"].get(first["id"])
    # The pair as the record holds it: whole conversations (JSON text).
    assert row["instruction"] == first["instruction"]
    assert json.loads(row["chosen"]) == first["chosen"]
    assert json.loads(row["chosen"])[-1]["content"] == first["chosen"][-1]["content"]
    assert row["score_chosen"] == first["score_chosen"]
    # Full-text search: a word of one instruction finds that record.
    word = max(first["instruction"].strip("?.").split(), key=len)
    hits = list(db["records"].search(word))
    assert first["id"] in {h["id"] for h in hits}
    assert all(word.lower() in (h["instruction"] + h["response"]).lower() for h in hits)
    assert db["messages"].foreign_keys[0].other_table == "records"
    # An existing file needs --overwrite.
    again = _export(data, rejects, db_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _export(data, rejects, db_path, "--overwrite").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.db"]


def test_datasette_serves_the_file_and_finds_a_record(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    datasette_app = pytest.importorskip("datasette.app")
    data, rejects = run
    db_path = tmp_path / "data.db"
    assert _export(data, rejects, db_path).returncode == 0
    first = json.loads(data.read_text().splitlines()[0])
    word = max(first["instruction"].strip("?.").split(), key=len)

    async def fetch() -> tuple[dict, str]:  # type: ignore[type-arg]
        ds = datasette_app.Datasette([str(db_path)])
        found = await ds.client.get(f"/data/records.json?_search={word}&_shape=objects")
        page = await ds.client.get(f"/data/records?_search={word}")
        assert found.status_code == 200 and page.status_code == 200
        return found.json(), page.text

    found, page = asyncio.run(fetch())
    assert first["id"] in {r["id"] for r in found["rows"]}
    assert first["id"] in page


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_headless_chromium_finds_a_record_in_datasette(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The README's browse command, with Debian's Chromium as the browser."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    pytest.importorskip("datasette")
    data, rejects = run
    db_path = tmp_path / "data.db"
    assert _export(data, rejects, db_path).returncode == 0
    first = json.loads(data.read_text().splitlines()[0])
    word = max(first["instruction"].strip("?.").split(), key=len)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "datasette", str(db_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/-/versions.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        url = f"{base}/data/records?_search={word}"
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<table" in dom and first["id"] in dom
    assert first["instruction"].split()[0] in dom


def test_the_file_is_written_by_the_one_atomic_writer(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bad line leaves nothing behind; a killed export's temporary file is
    swept by the next one; the file is 0644 (``store.atomic.AtomicFile``)."""
    from magpie.commands.publish.sqlite import export_sqlite
    from magpie.errors import UsageError

    data, rejects = run
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data.read_bytes() + b'{"id": 1}\n')
    db_path = tmp_path / "data.db"
    with pytest.raises(UsageError, match=r"bad\.jsonl line \d+ is not a magpie record"):
        export_sqlite(bad, db_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    stale = tmp_path / ".data.db.999999999.x1y2.tmp"  # its process is gone
    stale.write_bytes(b"half a database")
    done = export_sqlite(data, db_path, rejects=rejects)
    assert done.records == len(data.read_text().splitlines()) and done.rejects > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data.db"]
    assert db_path.stat().st_mode & 0o777 == 0o644
