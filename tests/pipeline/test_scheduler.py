"""The scheduler itself (:class:`magpie.pipeline.scheduler.Pipeline`), in
process over real HTTP against the Ollama test double: results come out in
index order whatever the timing, the stages run in their list order (down the
list before the response, up it after), and a stage's rejection reaches the
results with its reason."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from ollama_server import OllamaTestServer, ScriptedEngine, _instruction, build_models

from magpie.commands.generate import prepare
from magpie.pipeline.scheduler import Instruction, Pipeline, PipelineSettings
from magpie.pipeline.stages.balance import CategoryBalance
from magpie.pipeline.stages.base import Stage
from magpie.pipeline.stages.clean import Clean
from magpie.pipeline.stages.dedup.index import DedupIndex
from magpie.pipeline.stages.dedup.stage import Dedup
from magpie.pipeline.stages.filters import Filters, trailing_colon
from magpie.pipeline.stages.guard import Guard, GuardStage
from magpie.pipeline.stages.judge import Judge, JudgeStage
from magpie.pipeline.stages.reasoning import NoReasoning
from magpie.records import Record, Rejection
from magpie.settings import build_config

MODEL = "llama3.1:8b"


def _uneven(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    """Distinct instructions and answers; each request takes 0-40 ms by its
    seed, so concurrent attempts finish out of index order."""
    seed = int(options.get("seed") or 0)
    time.sleep(hashlib.blake2b(str(seed).encode(), digest_size=1).digest()[0] % 5 / 100)
    if isinstance(source, str):
        return _instruction(seed)
    return "Here is an answer: " + source[-1]["content"][:40]


@pytest.fixture()
def srv() -> Iterator[OllamaTestServer]:
    with OllamaTestServer(build_models(["llama3.1"], ScriptedEngine(text_fn=_uneven))) as s:
        yield s


async def _run(url: str, target: int, **kwargs: Any) -> tuple[list[Record | Rejection], Pipeline]:
    prep = await prepare(build_config({"model": MODEL, "host": url}, environ={}))
    settings = kwargs.pop("settings", None) or PipelineSettings()
    try:
        pipeline = Pipeline(prep.backend, prep.pre_query, seed=11, settings=settings, **kwargs)
        return [r async for r in pipeline.run(target)], pipeline
    finally:
        await prep.backend.aclose()


def _dump(results: list[Record | Rejection]) -> list[dict[str, Any]]:
    return [r.model_dump(exclude={"created_at"}) for r in results]


class Recorder(Stage):
    """Logs each call as (name, point, index); rejects where told to."""

    def __init__(self, name: str, log: list[tuple[str, str, int]], **rejects: int) -> None:
        self.name = name
        self.log = log
        self.rejects = rejects  # point -> the index to reject there
        self.closed = 0

    def _rejects(self, point: str, index: int) -> bool:
        return self.rejects.get(point) == index

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        self.log.append((self.name, "instruction", candidate.index))
        if self._rejects("instruction", candidate.index):
            return Rejection(index=candidate.index, reason=f"{self.name}_says_no", detail="early")
        return candidate

    async def on_pair(self, candidate: Instruction, record: Record) -> Record | Rejection:
        self.log.append((self.name, "pair", record.index))
        if self._rejects("pair", record.index):
            return Rejection(
                index=record.index, reason=f"{self.name}_pair", stage="judge", record=record
            )
        return record

    async def on_emit(self, result: Record | Rejection) -> Record | Rejection:
        self.log.append((self.name, "emit", result.index))
        if isinstance(result, Record) and self._rejects("emit", result.index):
            return Rejection(index=result.index, reason=f"{self.name}_emit", record=result)
        return result

    def revoke(self, record: Record) -> None:
        self.log.append((self.name, "revoke", record.index))

    def close(self) -> None:
        self.closed += 1


def test_results_come_out_in_index_order_under_concurrency(srv: OllamaTestServer) -> None:
    one, _ = asyncio.run(_run(srv.url, 12, settings=PipelineSettings(concurrency=1)))
    many, pipeline = asyncio.run(_run(srv.url, 12, settings=PipelineSettings(concurrency=6)))
    assert [r.index for r in many] == list(range(len(many)))
    assert sum(isinstance(r, Record) for r in many) == 12
    assert _dump(many) == _dump(one)  # the same records whatever the timing
    assert pipeline.next_index == len(many) and pipeline.stats.attempts == len(many)


def test_stages_run_down_the_list_before_the_response_and_up_it_after(
    srv: OllamaTestServer,
) -> None:
    log: list[tuple[str, str, int]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    results, pipeline = asyncio.run(
        _run(srv.url, 3, stages=[a, b], settings=PipelineSettings(concurrency=3))
    )
    assert pipeline.stages[-2:] == [a, b]
    assert [r.index for r in results] == [0, 1, 2]
    for i in range(3):
        mine = [(name, point) for name, point, index in log if index == i]
        assert mine == [
            ("a", "instruction"),
            ("b", "instruction"),
            ("b", "pair"),
            ("a", "pair"),
            ("b", "emit"),
            ("a", "emit"),
        ]
    emits = [index for name, point, index in log if point == "emit" and name == "a"]
    assert emits == [0, 1, 2]  # at emit, in index order
    assert a.closed == b.closed == 1


def test_a_stages_rejection_reaches_the_results_with_its_reason(srv: OllamaTestServer) -> None:
    log: list[tuple[str, str, int]] = []
    early = Recorder("early", log, instruction=1)
    late = Recorder("late", log, pair=2)
    results, pipeline = asyncio.run(_run(srv.url, 3, stages=[early, late]))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    first, second = results[1], results[2]
    assert isinstance(first, Rejection) and first.reason == "early_says_no"
    assert first.detail == "early" and first.record is None
    assert isinstance(second, Rejection) and second.reason == "late_pair"
    assert second.record is not None and second.record.index == 2  # the pair it would have been
    # A stage that rejects stops the others at that point: ``late`` never saw
    # instruction 1, ``early`` never saw pair 2; both still see each emit.
    assert ("late", "instruction", 1) not in log and ("early", "pair", 2) not in log
    assert ("late", "emit", 1) in log and ("early", "emit", 2) in log
    assert pipeline.stats.rejected == {"early_says_no": 1, "late_pair": 1}
    assert pipeline.stats.saved_responses == 1  # no response was asked for instruction 1
    chats = srv.requests_to("/api/chat")
    assert len(chats) == 4  # indexes 0, 2, 3, 4 were answered, 1 was not


def test_a_rejection_at_emit_is_revoked_from_the_stages_it_passed(srv: OllamaTestServer) -> None:
    log: list[tuple[str, str, int]] = []
    outer = Recorder("outer", log, emit=1)
    inner = Recorder("inner", log)
    results, _ = asyncio.run(_run(srv.url, 2, stages=[outer, inner]))
    assert [(r.index, type(r).__name__) for r in results] == [
        (0, "Record"),
        (1, "Rejection"),
        (2, "Record"),
    ]
    assert isinstance(results[1], Rejection) and results[1].reason == "outer_emit"
    at_emit = [(name, point) for name, point, index in log if index == 1 and point != "pair"]
    assert at_emit[-3:] == [("inner", "emit"), ("outer", "emit"), ("inner", "revoke")]


def test_a_stage_that_finds_no_usable_instruction_saves_no_response(
    srv: OllamaTestServer,
) -> None:
    class Unusable(Stage):
        saves_response = False

        async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
            if candidate.index == 0:
                return Rejection(index=0, reason="unusable", text=candidate.text)
            return candidate

    results, pipeline = asyncio.run(_run(srv.url, 2, stages=[Unusable()]))
    assert isinstance(results[0], Rejection) and results[0].reason == "unusable"
    assert pipeline.stats.saved_responses == 0


def test_the_built_in_stages_and_their_order(srv: OllamaTestServer) -> None:
    async def build() -> Pipeline:
        prep = await prepare(build_config({"model": MODEL, "host": srv.url}, environ={}))
        await prep.backend.aclose()
        return Pipeline(
            prep.backend,
            prep.pre_query,
            seed=1,
            filters=[trailing_colon],
            judge=Judge(prep.backend),
            dedup=DedupIndex(),
            balance=CategoryBalance(10),
            guard=Guard(prep.backend),
        )

    pipeline = asyncio.run(build())
    assert [type(s) for s in pipeline.stages] == [
        Clean,
        NoReasoning,
        Filters,
        Dedup,
        JudgeStage,
        CategoryBalance,
        GuardStage,
    ]
    bare = Pipeline(pipeline.backend, pipeline.pre_query, seed=1)
    assert [type(s) for s in bare.stages] == [Clean, NoReasoning]
