"""`magpie stats` and `magpie doctor` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from batch_helpers import gen_args, scripted_server
from magpie_cli import run_magpie

from conftest import CLOSED_PORT


def test_stats_json_and_html(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server() as srv:
        assert run_magpie(*gen_args(srv, out, 6, "--seed", "2")).returncode == 0
    proc = run_magpie("stats", str(out), "--json", "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["records"] == 6 and data["kept"] == 6 and data["unique_share"] == 1.0
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "<script src=" not in html
    table = run_magpie("stats", str(out))
    assert table.returncode == 0 and "6" in table.stdout


def test_stats_missing_file() -> None:
    proc = run_magpie("stats", "nope.jsonl")
    assert proc.returncode == 2 and "magpie: error:" in proc.stderr


def test_doctor_against_running_and_stopped_server() -> None:
    with scripted_server() as srv:
        ok = run_magpie("doctor", "--host", srv.url, "--model", "llama3.1:8b")
        assert ok.returncode == 0, ok.stderr
        assert "should work" in ok.stderr
        missing = run_magpie("doctor", "--host", srv.url, "--model", "qwen9:1t", "--json")
        assert missing.returncode == 3
        assert any("ollama pull qwen9:1t" in (c["fix"] or "") for c in json.loads(missing.stdout))
    down = run_magpie("doctor", "--backend", "ollama", "--json")
    assert down.returncode == 3
    checks = json.loads(down.stdout)
    failed = next(c for c in checks if not c["ok"])
    assert (
        f"127.0.0.1:{CLOSED_PORT}" in failed["detail"] + failed["fix"]
        and "ollama serve" in failed["fix"]
    )
