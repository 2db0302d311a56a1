"""Turns 2..T through the stages on the real Ollama (the ``real`` tier): the
guard classifies each exchange of a ``--turns 2`` run, with the conversation
before it, and an unsafe later turn rejects the record as ``turn2_guard_unsafe``.

No Llama Guard model can be made here (no hub), so the guard is SmolLM2 behind
a real Ollama template that decides its verdict by the conversation it is
sent (Go template ``len .Messages``): a few-shot pattern of ``safe`` for the
first user turn and its answer, of ``unsafe`` / ``S1`` from turn 2's question on
(the 135M model copies the pattern greedily; ``stop`` ends it after one).  The
real server then says unsafe exactly where a stage that sees later turns must
act, and where one that does not never looks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from magpie_cli import run_magpie
from real_servers import RealOllama, smollm2_gguf

from magpie.backends.ollama import OllamaBackend
from magpie.pipeline.scheduler import (
    Pipeline,
    PipelineSettings,
    default_instruction_sampling,
    default_response_sampling,
)
from magpie.pipeline.stages.guard import Guard
from magpie.pipeline.stages.judge import Thresholds
from magpie.records import Rejection
from magpie.templates.rendered import render_pre_query

from .helpers import check_records

GUARD = "turn-guard"
SHORT = ["--instruction-max-tokens", "128", "--response-max-tokens", "96", "--keep-truncated"]


def _guard_modelfile() -> str:
    unsafe = "Verdict: unsafe\nS1\n" * 6
    safe = "Verdict: safe\n" * 6
    template = (
        "{{ if gt (len .Messages) 2 }}" + unsafe + "Verdict:{{ else }}" + safe + "Verdict:{{ end }}"
    )
    return (
        f"FROM {smollm2_gguf()}\nPARAMETER num_thread 1\nPARAMETER stop Verdict\n"
        f'TEMPLATE """{template}"""\n'
    )


@pytest.fixture()
def turn_guard(ollama: RealOllama) -> RealOllama:
    ollama.create(GUARD, _guard_modelfile())
    return ollama


def test_the_guard_classifies_every_turn_on_the_real_server(
    turn_guard: RealOllama, tmp_path: Path
) -> None:
    out = tmp_path / "guarded.jsonl"
    res = run_magpie(
        *("generate", "--host", turn_guard.url, "--model", "smollm2", "-o", str(out)),
        *("-n", "1", "--seed", "5", "--turns", "2", "--guard", GUARD, *SHORT),
        timeout=900,
    )
    assert res.returncode == 0, res.stderr
    (rec,) = check_records(out, 1)
    guard = rec["guard"]
    assert guard["model"] == GUARD
    assert guard["instruction"] == {"verdict": "safe", "categories": []}
    assert guard["response"] == {"verdict": "safe", "categories": []}
    # Turn 2's question and answer, each read with the conversation before it.
    assert guard["turns"] == [
        {
            "instruction": {"verdict": "unsafe", "categories": ["S1"]},
            "response": {"verdict": "unsafe", "categories": ["S1"]},
        }
    ]


def test_an_unsafe_later_turn_rejects_the_record(turn_guard: RealOllama) -> None:
    async def attempts() -> list[Rejection]:
        async with (
            OllamaBackend("smollm2", turn_guard.url) as gen,
            OllamaBackend(GUARD, turn_guard.url) as guard_backend,
        ):
            pre_query = await render_pre_query(gen, await gen.describe(), None)
            short = {"max_tokens": 96}
            settings = PipelineSettings(
                instruction=default_instruction_sampling().model_copy(update=short),
                response=default_response_sampling().model_copy(update=short),
                turns=2,
                keep_truncated=True,
                thresholds=Thresholds(drop_unsafe=True),
            )
            pipe = Pipeline(gen, pre_query, seed=5, settings=settings, guard=Guard(guard_backend))
            out = []
            for index in range(6):  # until one attempt reaches turn 2
                result = await pipe.attempt(index)
                assert isinstance(result, Rejection), result
                out.append(result)
                if result.reason.startswith("turn2_"):
                    break
            return out

    results = asyncio.run(attempts())
    last = results[-1]
    assert last.reason == "turn2_guard_unsafe", [r.reason for r in results]
    assert last.stage == "guard" and last.detail == "instruction: S1"
    # It carries the conversation up to the question it rejected, never answered.
    assert last.record is not None and [m.role for m in last.record.messages] == [
        "user",
        "assistant",
        "user",
    ]
    assert last.record.guard is not None and last.record.guard.response is not None
    assert last.record.guard.response.verdict == "safe"
