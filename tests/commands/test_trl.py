"""The raw JSONL loads into the real TRL's SFTTrainer and DPOTrainer as it is
(issue 14): one step each on a tiny model built here, under two hash seeds.

Schema 1 put ``{"content", "score"}`` objects (or null) under ``chosen`` and
``rejected``, keys TRL reserves; TRL's ``is_conversational`` looks at one
reserved key popped from a set, so the same file trained or failed with
``KeyError: 'text'`` depending on ``PYTHONHASHSEED``.  Seeds 0 and 2 make it pop
``rejected`` / ``chosen`` of the set {messages, chosen, rejected}: both failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from batch_helpers import MODEL, preference_engine
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, build_models

pytest.importorskip("trl", reason="TRL is installed by .ci/run (after torch==2.13.0)")

#: Slow tier (tests/support/tiers.py): loads a model, trains or drives a browser.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "trl_one_step.py"
SEEDS = ("0", "2")


def _generate(srv: OllamaTestServer, out: Path, *extra: str) -> None:
    proc = run_magpie(
        "generate", "-n", "4", "--model", MODEL, "--host", srv.url, "--seed", "7", "-o", str(out),
        *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A plain run and a ``--responses 3 --judge`` run (preference pairs)."""
    d = tmp_path_factory.mktemp("trl")
    plain, pairs = d / "plain.jsonl", d / "pairs.jsonl"
    with OllamaTestServer(build_models(["llama3.1"], preference_engine())) as srv:
        _generate(srv, plain)
        _generate(srv, pairs, "--responses", "3", "--judge", "same")
    return plain, pairs


def _one_step(seed: str, workdir: Path, *files: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONHASHSEED=seed, TOKENIZERS_PARALLELISM="false")
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, files), str(workdir)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seed", SEEDS)
def test_raw_jsonl_trains_one_sft_and_one_dpo_step(
    raw_files: tuple[Path, Path], tmp_path: Path, seed: str
) -> None:
    plain, pairs = raw_files
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert all(r["chosen"][-1]["role"] == "assistant" for r in rows)
    # The paired file as it is, into both trainers.
    res = _one_step(seed, tmp_path / "pairs", pairs, pairs)
    assert res["sft_key"] in ("chosen", "rejected")  # the order that failed with schema 1
    assert res["dpo_key"] in ("chosen", "rejected", "messages")
    assert float(res["sft_loss"]) > 0 and float(res["dpo_loss"]) > 0  # type: ignore[arg-type]
    # A plain file: messages is the only reserved key left.
    assert not {"chosen", "rejected"} & set(json.loads(plain.read_text().splitlines()[0]))
    res = _one_step(seed, tmp_path / "plain", plain)
    assert res["sft_key"] == "messages" and float(res["sft_loss"]) > 0  # type: ignore[arg-type]
