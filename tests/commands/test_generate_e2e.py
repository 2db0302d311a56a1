"""End to end: ``magpie generate`` through the CLI, on the embedded backend and
on the Ollama-protocol test server driven by the real ``ollama`` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from magpie_cli import run_magpie

from magpie.records import SCHEMA_VERSION, Record

SMALL = ["--instruction-max-tokens", "96", "--response-max-tokens", "128", "--keep-truncated"]
SMOLLM2_PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\n"
)
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "seed", "num_predict", "stop", "repeat_penalty"}


def records_of(text: str) -> list[Record]:
    lines = text.splitlines()
    recs = [Record.model_validate_json(line) for line in lines]
    for line in lines:
        assert json.loads(line)["schema_version"] == SCHEMA_VERSION
    return recs


def assert_valid(recs: list[Record], n: int) -> None:
    assert len(recs) == n
    assert len({r.id for r in recs}) == n
    assert [r.index for r in recs] == sorted(r.index for r in recs)
    for r in recs:
        assert r.instruction.strip() and r.response.strip()
        assert [m.role for m in r.messages] == ["user", "assistant"]
        assert r.messages[0].content == r.instruction and r.messages[1].content == r.response
        assert r.instruction_generation.seed != r.response_generation.seed


@pytest.mark.slow
def test_generate_embedded(tmp_path: Path) -> None:
    proc = run_magpie(
        "generate", "-n", "5", "--backend", "embedded", "--seed", "11", *SMALL, "-o", "out.jsonl"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    recs = records_of((tmp_path / "out.jsonl").read_text())
    assert_valid(recs, 5)
    assert {r.backend for r in recs} == {"embedded"}
    assert {r.template for r in recs} == {"gguf-jinja:chatml"}
    assert recs[0].model.endswith(".gguf")
    assert "backend embedded" in proc.stderr
    assert "5 written" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_generate_through_ollama_test_server(smollm2_double) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie(
        "generate",
        "-n",
        "5",
        "--model",
        "smollm2:135m",
        "--host",
        smollm2_double.url,
        "--seed",
        "5",
        *SMALL,
        "-o",
        "-",
    )
    assert proc.returncode == 0, proc.stderr
    recs = records_of(proc.stdout)  # stdout holds JSONL and nothing else
    assert_valid(recs, 5)
    assert {r.backend for r in recs} == {"ollama"} and {r.host for r in recs} == {
        smollm2_double.url
    }
    assert {r.template for r in recs} == {"smollm2"}
    assert "backend ollama" in proc.stderr

    # (a request cancelled at the end of the run may have sent no body)
    gens = [r for r in smollm2_double.requests_to("/api/generate") if r.body is not None]
    chats = [r for r in smollm2_double.requests_to("/api/chat") if r.body is not None]
    assert smollm2_double.requests_to("/api/show")
    assert len(chats) >= 5 and len(gens) >= 5  # (a surplus attempt near the end: cancelled)
    seeds = set()
    for req in gens:
        body = req.body
        assert body["raw"] is True and body["model"] == "smollm2:135m"
        assert body["prompt"] == SMOLLM2_PRE_QUERY  # its SYSTEM block rendered in
        assert "system" not in body and "template" not in body
        assert not SAMPLING_KEYS & set(body)  # sampling only inside options
        opts = body["options"]
        assert opts["num_predict"] == 96 and opts["temperature"] == 1.0 and opts["top_p"] == 1.0
        assert opts["top_k"] == 0
        assert "<|im_end|>" in opts["stop"] and "<|im_start|>" in opts["stop"]
        seeds.add(opts["seed"])
    assert len(seeds) == len(gens)  # no two requests share a seed
    # Pairs run concurrently: compare the chats as a set.
    # (plus, maybe, the answer of a surplus attempt cancelled at the end).
    asked = {json.dumps(req.body["messages"]) for req in chats}
    assert {json.dumps([{"role": "user", "content": r.instruction}]) for r in recs} <= asked
    for req in chats:
        body = req.body
        assert not SAMPLING_KEYS & set(body)
        assert body["options"]["temperature"] == 0.0 and body["options"]["num_predict"] == 128


@pytest.mark.parametrize(
    ("model", "family", "prompt"),
    [
        ("llama3.1:8b", "llama3", "<|start_header_id|>user<|end_header_id|>\n\n"),
        ("gemma2:2b", "gemma", "<start_of_turn>user\n\n"),
        ("phi3:mini", "phi3", "<|user|>\n"),
        ("mistral:7b", "mistral", "[INST] "),
        (
            "qwen2.5:0.5b",
            "qwen2.5",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        ),
    ],
)
def test_auto_template_and_bos_through_ollama(
    scripted_ollama, model: str, family: str, prompt: str
) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie(
        "generate", "-n", "2", "--model", model, "--host", scripted_ollama.url, "--seed", "1"
    )
    assert proc.returncode == 0, proc.stderr
    recs = records_of(proc.stdout)
    assert_valid(recs, 2)
    assert {r.template for r in recs} == {family}
    gens = scripted_ollama.requests_to("/api/generate")
    # BOS is never sent through Ollama: its tokenizer adds it.
    assert {g.body["prompt"] for g in gens} == {prompt}


def test_named_template_and_system_through_ollama(scripted_ollama) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie(
        "generate",
        "-n",
        "1",
        "--model",
        "llama3:8b",
        "--host",
        scripted_ollama.url,
        "--template",
        "llama3",
        "--system",
        "You write math problems.",
    )
    assert proc.returncode == 0, proc.stderr
    rec = records_of(proc.stdout)[0]
    assert rec.system == "You write math problems." and rec.template == "llama3"
    prompt = scripted_ollama.requests_to("/api/generate")[0].body["prompt"]
    assert prompt == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou write math problems.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )


def test_auto_backend_prefers_running_ollama(scripted_ollama) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie("generate", "-n", "1", env={"OLLAMA_HOST": scripted_ollama.url})
    assert proc.returncode == 0, proc.stderr
    assert "backend ollama: llama3.1:8b" in proc.stderr and "Ollama is running" in proc.stderr
    assert records_of(proc.stdout)[0].model == "llama3.1:8b"


def test_unknown_model_says_ollama_pull(scripted_ollama) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie("generate", "-n", "1", "--model", "llama9:1t", "--host", scripted_ollama.url)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert "ollama pull llama9:1t" in proc.stderr and "Traceback" not in proc.stderr


def test_undetectable_template_lists_families(tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ollama_server import OllamaTestServer, ScriptedEngine, build_models

    with OllamaTestServer(build_models(["unknown"], ScriptedEngine())) as srv:
        proc = run_magpie("generate", "-n", "1", "--model", "alfred:40b", "--host", srv.url)
    assert proc.returncode == 2, proc.stderr
    assert "cannot detect the template" in proc.stderr and "llama3" in proc.stderr


def test_top_up_continues_seed_and_indexes(scripted_ollama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host = ["--model", "llama3.1:8b", "--host", scripted_ollama.url]
    out = tmp_path / "d.jsonl"
    assert run_magpie("generate", "-n", "3", *host, "--seed", "9", "-o", str(out)).returncode == 0
    first = records_of(out.read_text())
    proc = run_magpie("generate", "-n", "5", *host, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "holds 3 records; generating 2 more" in proc.stderr
    recs = records_of(out.read_text())
    assert_valid(recs, 5)
    assert recs[:3] == first
    assert {r.seed for r in recs} == {9}
    assert recs[3].index > first[-1].index
    before = out.read_bytes()
    proc = run_magpie("generate", "-n", "5", *host, "-o", str(out))
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    assert out.read_bytes() == before
    proc = run_magpie("generate", "-n", "2", *host, "--overwrite", "-o", str(out))
    assert proc.returncode == 0
    assert len(records_of(out.read_text())) == 2


def test_quiet_prints_nothing_on_success(scripted_ollama) -> None:  # type: ignore[no-untyped-def]
    proc = run_magpie(
        "generate", "-n", "2", "--model", "llama3.1:8b", "--host", scripted_ollama.url, "-q"
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert len(records_of(proc.stdout)) == 2


def test_config_file_run(scripted_ollama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "run.toml").write_text(
        f'num = 3\noutput = "cfg.jsonl"\nmodel = "llama3.1:8b"\nhost = "{scripted_ollama.url}"\n'
        "seed = 4\n[response]\nmax_tokens = 77\n"
    )
    # OLLAMA_HOST, like every environment setting, would win over the file.
    proc = run_magpie("generate", "--config", "run.toml", "-n", "2", env={"OLLAMA_HOST": ""})
    assert proc.returncode == 0, proc.stderr
    recs = records_of((tmp_path / "cfg.jsonl").read_text())
    assert len(recs) == 2 and recs[0].seed == 4
    assert recs[0].response_generation.max_tokens == 77
    assert recs[0].response_generation.temperature == 0.0


def test_export_and_load_with_datasets(scripted_ollama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "d.jsonl"
    proc = run_magpie(
        "generate",
        "-n",
        "4",
        "--model",
        "llama3.1:8b",
        "--host",
        scripted_ollama.url,
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == 4 and ds[0]["messages"][0]["role"] == "user"
    for fmt, column in (
        ("openai", "messages"),
        ("sharegpt", "conversations"),
        ("alpaca", "instruction"),
    ):
        target = tmp_path / f"{fmt}.jsonl"
        proc = run_magpie("export", str(out), "--format", fmt, "-o", str(target))
        assert proc.returncode == 0, proc.stderr
        exported = datasets.load_dataset("json", data_files=str(target), split="train")
        assert exported.num_rows == 4 and column in exported.column_names


@pytest.mark.slow
def test_pipe_into_finetuning_loader(scripted_ollama) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    proc = run_magpie(
        "generate", "-n", "3", "--model", "llama3.1:8b", "--host", scripted_ollama.url, "-q"
    )
    script = Path(__file__).resolve().parents[2] / "examples" / "load_for_finetuning.py"
    loader = subprocess.run(
        [sys.executable, str(script)], input=proc.stdout, capture_output=True, text=True
    )
    assert loader.returncode == 0, loader.stderr
    assert "3 conversations" in loader.stderr
