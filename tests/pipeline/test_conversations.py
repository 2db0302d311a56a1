"""Multi-turn conversations, system prompt sets, sampling schedules and
preference pairs (issue 6), through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import (
    MODEL,
    gen_args,
    json_lines,
    preference_engine,
    read_records,
    scripted_server,
)
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, build_models


@pytest.mark.parametrize(
    ("slug", "model", "user_header", "after_user", "after_assistant"),
    [
        (
            "llama3.1",
            "llama3.1:8b",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
        (
            "gemma2",
            "gemma2:2b",
            "<start_of_turn>user\n",
            "<end_of_turn>\n<start_of_turn>model\n",
            "<end_of_turn>\n",
        ),
    ],
)
def test_turns_on_ollama_for_two_families(
    tmp_path: Path, slug, model, user_header, after_user, after_assistant
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "d.jsonl"
    with OllamaTestServer(build_models([slug], ScriptedEngine())) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "2",
            "--model",
            model,
            "--host",
            srv.url,
            "--seed",
            "4",
            "--turns",
            "3",
            "-o",
            str(out),
        )
        prompts = [g.body["prompt"] for g in srv.requests_to("/api/generate")]
        chats = [c.body["messages"] for c in srv.requests_to("/api/chat")]
    assert proc.returncode == 0, proc.stderr
    recs = read_records(out)
    assert len(recs) == 2
    for rec in recs:
        assert rec.turns == 3 and [m.role for m in rec.messages] == ["user", "assistant"] * 3
        assert len(rec.turn_generations or []) == 2
        m = [x.content for x in rec.messages]
        # The follow-up question was asked with the whole conversation rendered in
        # the family's template, ending in the user header.
        second = next(p for p in prompts if m[0] in p and m[2] not in p)
        assert second.endswith(m[0] + after_user + m[1] + after_assistant + user_header)
        assert [
            {"role": r, "content": c}
            for r, c in zip(["user", "assistant", "user"], m[:3], strict=True)
        ] in chats
    assert proc.stderr.splitlines()[-1].startswith("magpie: 2 written")


@pytest.mark.slow
def test_turns_on_embedded_backend(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    proc = run_magpie(
        "generate",
        "-n",
        "1",
        "--backend",
        "embedded",
        "--seed",
        "2",
        "--turns",
        "2",
        "--instruction-max-tokens",
        "48",
        "--response-max-tokens",
        "48",
        "--keep-truncated",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    rec = read_records(out)[0]
    assert rec.turns == 2 and len(rec.messages) == 4
    assert all(m.content.strip() for m in rec.messages)
    exported = run_magpie("export", str(out), "--format", "sharegpt")
    assert [t["from"] for t in json.loads(exported.stdout)["conversations"]] == ["human", "gpt"] * 2


def test_weighted_system_prompts_are_sampled_reproducibly(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        '[systems.math]\npreset = "math"\nweight = 3\n'
        '[systems.poet]\nprompt = "You help people write poems."\nweight = 1\n'
    )
    names = []
    with scripted_server() as srv:
        for out in ("a.jsonl", "b.jsonl"):
            proc = run_magpie(
                *gen_args(srv, tmp_path / out, 12, "--seed", "9", "--config", "run.toml")
            )
            assert proc.returncode == 0, proc.stderr
            names.append([r.system_name for r in read_records(tmp_path / out)])
        prompts = {g.body["prompt"] for g in srv.requests_to("/api/generate")}
    assert names[0] == names[1]  # same seed, same draws
    assert set(names[0]) == {"math", "poet"} and names[0].count("math") > names[0].count("poet")
    assert any("step-by-step guidance on solving math problems" in p for p in prompts)
    assert any("You help people write poems." in p for p in prompts)
    rec = read_records(tmp_path / "a.jsonl")[0]
    assert rec.system and rec.system_name in ("math", "poet")


def test_system_preset_and_errors(tmp_path: Path) -> None:
    with scripted_server() as srv:
        proc = run_magpie(*gen_args(srv, tmp_path / "d.jsonl", 1, "--system-preset", "code"))
        assert proc.returncode == 0, proc.stderr
        assert "help with programming tasks" in srv.requests_to("/api/generate")[0].body["prompt"]
    bad = run_magpie("generate", "--backend", "ollama", "--system-preset", "cooking")
    assert bad.returncode == 2 and "unknown system preset" in bad.stderr
    both = run_magpie("generate", "--backend", "ollama", "--system-preset", "math", "--system", "x")
    assert both.returncode == 2


def test_sampling_schedule_cycles(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text("schedule = [[1.0, 1.0], [1.25, 0.99]]\n")
    with scripted_server() as srv:
        proc = run_magpie(
            *gen_args(
                srv, tmp_path / "d.jsonl", 4, "--seed", "1", "--config", "run.toml", "-c", "1"
            )
        )
        options = [g.body["options"] for g in srv.requests_to("/api/generate")]
    assert proc.returncode == 0, proc.stderr
    pairs = {(o["temperature"], o["top_p"]) for o in options}
    assert pairs == {(1.0, 1.0), (1.25, 0.99)}
    recs = read_records(tmp_path / "d.jsonl")
    assert {r.instruction_generation.temperature for r in recs} == {1.0, 1.25}
    assert "100% unique instructions" in proc.stderr.splitlines()[-1]


def test_min_p_is_sent_and_recorded_only_when_given(tmp_path: Path) -> None:
    with scripted_server() as srv:
        given = run_magpie(
            *gen_args(srv, tmp_path / "a.jsonl", 2, "--seed", "1", "--instruction-min-p", "0.1")
        )
        sent = [g.body["options"] for g in srv.requests_to("/api/generate")]
        answers = [c.body["options"] for c in srv.requests_to("/api/chat")]
        srv.clear_requests()
        plain = run_magpie(*gen_args(srv, tmp_path / "b.jsonl", 2, "--seed", "1"))
        unsent = [g.body["options"] for g in srv.requests_to("/api/generate")]
    assert given.returncode == 0, given.stderr
    assert plain.returncode == 0, plain.stderr
    assert sent and all(o["min_p"] == 0.1 for o in sent)
    assert answers and all("min_p" not in o for o in answers)  # --response-min-p not given
    assert unsent and all("min_p" not in o for o in unsent)
    assert {r.instruction_generation.min_p for r in read_records(tmp_path / "a.jsonl")} == {0.1}
    line = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
    assert "min_p" not in line["instruction_generation"]  # records as before the option


def test_preference_pairs_and_dpo_export(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out, dpo = tmp_path / "d.jsonl", tmp_path / "dpo.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], preference_engine())) as srv:
        proc = run_magpie(
            "generate",
            "-n",
            "3",
            "--model",
            MODEL,
            "--host",
            srv.url,
            "--seed",
            "7",
            "--responses",
            "4",
            "--judge",
            "same",
            "-o",
            str(out),
        )
        answer_temps = {
            c.body["options"]["temperature"]
            for c in srv.requests_to("/api/chat")
            if "data-quality judge" not in c.body["messages"][0]["content"]
        }
    assert proc.returncode == 0, proc.stderr
    assert answer_temps == {0.8}
    recs = read_records(out)
    for rec in recs:
        assert rec.responses and len(rec.responses) == 4
        pair = rec.preference()
        assert pair is not None and pair.score_chosen >= pair.score_rejected
        assert rec.response == pair.chosen and rec.judge.response_score == pair.score_chosen
        assert rec.chosen == rec.messages and rec.rejected[0] == rec.messages[0]
    proc = run_magpie("export", str(out), "--format", "dpo", "-o", str(dpo))
    assert proc.returncode == 0, proc.stderr
    rows = json_lines(dpo.read_text())
    assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    ds = datasets.load_dataset("json", data_files=str(dpo), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds[0]["prompt"][0]["role"] == "user" and ds[0]["chosen"][0]["role"] == "assistant"


def test_responses_with_turns_is_refused() -> None:
    proc = run_magpie("generate", "--backend", "ollama", "--responses", "3", "--turns", "2")
    assert proc.returncode == 2 and "--responses" in proc.stderr
