"""`magpie generate --backend openai` end to end against the OpenAI-protocol test server."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_helpers import assert_exact
from magpie_cli import run_magpie
from ollama_server import ScriptedEngine
from openai_server import OpenAITestServer, smollm2_served

SMOLLM2_PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\n"
)


def test_vllm_flavour_needs_a_named_template(tmp_path: Path) -> None:
    with OpenAITestServer(
        [smollm2_served(ScriptedEngine(), model_id="smol")], flavor="vllm"
    ) as srv:
        auto = run_magpie("generate", "--backend", "openai", "--host", srv.url, "-n", "2")
        assert auto.returncode == 2 and "--template" in auto.stderr
        out = tmp_path / "d.jsonl"
        proc = run_magpie(
            "generate",
            "--backend",
            "openai",
            "--host",
            srv.url,
            "--template",
            "smollm2",
            "-n",
            "4",
            "--seed",
            "3",
            "-o",
            str(out),
        )
        completions = srv.requests_to("/v1/completions")
    assert proc.returncode == 0, proc.stderr
    recs = assert_exact(out, 4)
    assert {r.backend for r in recs} == {"openai"} and {r.model for r in recs} == {"smol"}
    body = completions[0].body
    assert body["prompt"] == SMOLLM2_PRE_QUERY and body["stream"] is True
    assert body["max_tokens"] == 512 and body["temperature"] == 1.0 and "seed" in body
    assert len({c.body["seed"] for c in completions}) == len(completions)


@pytest.mark.parametrize(
    ("apply_template", "source"), [(True, "apply-template"), (False, "gguf-jinja")]
)
def test_llamacpp_flavour_auto_template(tmp_path: Path, apply_template: bool, source: str) -> None:
    """From the server's /apply-template, or (an older llama.cpp) from the GGUF
    template that /props shows: the same pre-query."""
    served = smollm2_served(ScriptedEngine(), model_id="smollm2.gguf")
    with OpenAITestServer([served], flavor="llamacpp", apply_template=apply_template) as srv:
        proc = run_magpie(
            "generate",
            "--backend",
            "openai",
            "--host",
            srv.url,
            "-n",
            "3",
            "-o",
            "-",
            env={"OLLAMA_HOST": "http://127.0.0.1:11434"},  # never used for --backend openai
        )
        prompts = {c.body["prompt"] for c in srv.requests_to("/v1/completions")}
    assert proc.returncode == 0, proc.stderr
    assert prompts == {SMOLLM2_PRE_QUERY}
    assert f"({source})" in proc.stderr


def test_openai_server_down() -> None:
    proc = run_magpie("generate", "--backend", "openai", "--host", "http://127.0.0.1:9", "-n", "1")
    assert (
        proc.returncode == 3 and "not reachable" in proc.stderr and "Traceback" not in proc.stderr
    )
