"""Scale-out: several hosts (one stopped mid-run), and shards of one run."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_helpers import (
    FAST_RETRY,
    MODEL,
    assert_exact,
    read_records,
    scripted_server,
    wait_for_lines,
)
from magpie_cli import popen_magpie, run_magpie


@pytest.mark.slow
def test_two_hosts_one_stopped_mid_run(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with scripted_server(latency=0.05) as a, scripted_server(latency=0.05) as b:
        proc = popen_magpie(
            "generate",
            "-n",
            "40",
            "--model",
            MODEL,
            "--host",
            a.url,
            "--host",
            b.url,
            "--seed",
            "5",
            "-o",
            str(out),
            *FAST_RETRY,
        )
        wait_for_lines(out, 8)
        a.stop()  # host A goes away for good
        _, err = proc.communicate(timeout=120)
        served_b = b.served["/api/chat"]
    assert proc.returncode == 0, err
    recs = assert_exact(out, 40)
    hosts = {r.host for r in recs}
    assert hosts == {a.url, b.url}  # both served pairs...
    late = [r.host for r in recs[-10:]]
    assert set(late) == {b.url}  # ...and the work shifted to the live host
    assert served_b >= 30
    summary = err.strip().splitlines()[-1]
    assert "pairs per host" in summary and b.url in summary


def test_host_list_in_config_and_per_host_limit(tmp_path: Path) -> None:
    with scripted_server(latency=0.2) as a, scripted_server(latency=0.2) as b:
        (tmp_path / "run.toml").write_text(
            f'model = "{MODEL}"\nhost = ["{a.url}", "{b.url}"]\nper_host = 2\nconcurrency = 4\n'
        )
        proc = run_magpie(
            "generate", "--config", "run.toml", "-n", "8", "-o", "d.jsonl", env={"OLLAMA_HOST": ""}
        )
        peaks = (a.peak_concurrency, b.peak_concurrency)
    assert proc.returncode == 0, proc.stderr
    assert_exact(tmp_path / "d.jsonl", 8)
    assert max(peaks) <= 2 and min(peaks) >= 1


def test_shards_are_disjoint_and_merge_cleanly(tmp_path: Path) -> None:
    with scripted_server() as srv:
        for i in range(3):
            proc = run_magpie(
                "generate",
                "-n",
                "6",
                "--model",
                MODEL,
                "--host",
                srv.url,
                "--seed",
                "42",
                "--shard",
                f"{i}/3",
                "-o",
                f"s{i}.jsonl",
            )
            assert proc.returncode == 0, proc.stderr
        gens = srv.requests_to("/api/generate")
    shards = [read_records(tmp_path / f"s{i}.jsonl") for i in range(3)]
    for i, recs in enumerate(shards):
        assert len(recs) == 6 and all(r.index % 3 == i for r in recs)
    ids = [r.id for recs in shards for r in recs]
    assert len(set(ids)) == 18
    request_seeds = [g.body["options"]["seed"] for g in gens]
    assert len(set(request_seeds)) == len(request_seeds)  # no two machines share a seed


def test_shard_top_up_continues_in_its_own_index_class(tmp_path: Path) -> None:
    with scripted_server() as srv:
        base = [
            "generate",
            "--model",
            MODEL,
            "--host",
            srv.url,
            "--seed",
            "1",
            "--shard",
            "1/4",
            "-o",
            "s.jsonl",
        ]
        assert run_magpie(*base, "-n", "3").returncode == 0
        assert run_magpie(*base, "-n", "5").returncode == 0
        other = run_magpie(
            "generate",
            "--model",
            MODEL,
            "--host",
            srv.url,
            "--shard",
            "2/4",
            "-o",
            "s.jsonl",
            "-n",
            "6",
        )
    recs = read_records(tmp_path / "s.jsonl")
    assert len(recs) == 5 and all(r.index % 4 == 1 for r in recs)
    assert other.returncode == 2 and "shard" in other.stderr


def test_bad_shard_spec() -> None:
    for spec in ("3/3", "x", "1/0"):
        proc = run_magpie("generate", "--backend", "ollama", "--shard", spec)
        assert proc.returncode == 2, (spec, proc.stderr)
        assert "shard" in proc.stderr
