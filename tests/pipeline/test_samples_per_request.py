"""``--samples-per-request N``: N instructions from one ``n``-sample request.

Against the OpenAI-protocol test server (scripted engine: ``n`` choices, choice
``i`` seeded with ``seed + i`` as vLLM does), through the real ``magpie``
command where the subject is the command (request counts, top-up, signals,
shards, usage errors) and through :class:`Pipeline` where it is the grouping.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import assert_exact, manifest_of, read_records, wait_for_lines
from magpie_cli import popen_magpie, run_magpie
from openai_server import OpenAITestServer, ScriptedEngine, ServedModel

from magpie.backends.base import ModelInfo
from magpie.backends.ollama import OllamaBackend
from magpie.backends.openai import OpenAIBackend
from magpie.backends.pool import HostPool
from magpie.errors import UsageError
from magpie.pipeline.scheduler import Pipeline, PipelineSettings, SystemChoice
from magpie.records import Record, Rejection, derive_seed
from magpie.templates import resolve_pre_query

MODEL = "smol"
COMPLETIONS = "/v1/completions"


def server(**kw: Any) -> OpenAITestServer:
    """A vLLM-flavoured server with the scripted engine (no model is loaded)."""
    return OpenAITestServer([ServedModel(MODEL, ScriptedEngine())], flavor="vllm", **kw)


@pytest.fixture()
def srv() -> Iterator[OpenAITestServer]:
    with server() as s:
        yield s


def gen(url: str | list[str], out: Path | str, n: int, *extra: str) -> list[str]:
    hosts = [url] if isinstance(url, str) else url
    return [
        "generate",
        "--backend",
        "openai",
        *(a for h in hosts for a in ("--host", h)),
        "--model",
        MODEL,
        "--template",
        "chatml",
        "-n",
        str(n),
        "-o",
        str(out),
        "--backoff-base",
        "0.05",
        *extra,
    ]


def instruction_requests(srv: OpenAITestServer) -> list[dict[str, Any]]:
    return [r.body for r in srv.requests_to(COMPLETIONS)]


def same_records(a: list[Record], b: list[Record]) -> None:
    def key(r: Record) -> tuple[Any, ...]:
        g = r.instruction_generation
        return (r.id, r.index, r.instruction, r.response, g.seed, g.n, g.choice, g.temperature)

    assert [key(r) for r in a] == [key(r) for r in b]


# --------------------------------------------------------------------------- the command


def test_four_samples_per_request_cost_a_quarter_of_the_requests(
    srv: OpenAITestServer, tmp_path: Path
) -> None:
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    proc = run_magpie(*gen(srv.url, one, 16, "--seed", "3", "--no-dedup"))
    assert proc.returncode == 0, proc.stderr
    bodies_one = instruction_requests(srv)
    srv.clear_requests()
    # The environment variable, as every setting has one.
    env = {"MAGPIE_SAMPLES_PER_REQUEST": "4"}
    proc = run_magpie(*gen(srv.url, four, 16, "--seed", "3", "--no-dedup"), env=env)
    assert proc.returncode == 0, proc.stderr
    bodies_four = instruction_requests(srv)
    a, b = assert_exact(one, 16), assert_exact(four, 16)

    # Default: today's requests exactly (no "n"), one per attempt.
    assert len(bodies_one) == 16 and all("n" not in body for body in bodies_one)
    # N = 4: a quarter of the instruction requests, each for 4 samples, one per group.
    assert len(bodies_four) == 4 and all(body["n"] == 4 for body in bodies_four)
    assert srv.samples[COMPLETIONS] == 16
    assert sorted(body["seed"] for body in bodies_four) == [
        derive_seed(3, i, "instruction") for i in (0, 4, 8, 12)
    ]
    # Choice j of a group goes to its j-th attempt; the stage info says so.
    for r in b:
        g = r.instruction_generation
        assert (g.n, g.choice, g.seed) == (
            4,
            r.index % 4,
            derive_seed(3, r.index // 4 * 4, "instruction"),
        )
        assert r.response_generation.seed == derive_seed(3, r.index, "response")
    # Choice 0 is sampled with the group's own seed: the same text as N = 1 gave.
    assert [r.instruction for r in a][::4] == [r.instruction for r in b][::4]
    assert len({r.instruction for r in b}) == 16
    # Records of one-sample requests carry no n/choice at all (written as before).
    first = json.loads(one.read_text().splitlines()[0])["instruction_generation"]
    assert "n" not in first and "choice" not in first
    assert manifest_of(four).settings["samples_per_request"] == 4


def test_top_up_from_the_middle_of_a_group_equals_one_run(
    srv: OpenAITestServer, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    args = ("--seed", "11", "--samples-per-request", "4", "-c", "3")
    assert run_magpie(*gen(srv.url, whole, 12, *args)).returncode == 0
    srv.clear_requests()
    first = run_magpie(*gen(srv.url, parts, 3, *args))
    assert first.returncode == 0, first.stderr
    second = run_magpie(*gen(srv.url, parts, 12, *args))
    assert second.returncode == 0, second.stderr
    runs = manifest_of(parts).runs
    assert runs[1].start_index % 4 != 0  # the top-up starts inside a group...
    group_seed = derive_seed(11, runs[1].start_index // 4 * 4, "instruction")
    # ...whose request is made again (once by each run).
    assert [b["seed"] for b in instruction_requests(srv)].count(group_seed) == 2
    same_records(read_records(whole), assert_exact(parts, 12))


@pytest.mark.slow
def test_sigint_with_groups_in_flight_then_resume_equals_one_run(tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    args = ("--seed", "5", "--samples-per-request", "4", "-c", "3")
    with server(latency=0.15) as srv:
        assert run_magpie(*gen(srv.url, whole, 14, *args)).returncode == 0
        proc = popen_magpie(*gen(srv.url, parts, 14, *args, "--grace-period", "0"))
        wait_for_lines(parts, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 130), err
        resumed = run_magpie(*gen(srv.url, parts, 14, *args))
    assert resumed.returncode == 0, resumed.stderr
    same_records(read_records(whole), assert_exact(parts, 14))


def test_shards_with_groups_stay_disjoint(srv: OpenAITestServer, tmp_path: Path) -> None:
    for i in range(3):
        proc = run_magpie(
            *gen(srv.url, tmp_path / f"s{i}.jsonl", 6, "--seed", "42", "--shard", f"{i}/3"),
            "--samples-per-request",
            "4",
        )
        assert proc.returncode == 0, proc.stderr
    shards = [read_records(tmp_path / f"s{i}.jsonl") for i in range(3)]
    for i, recs in enumerate(shards):
        assert len(recs) == 6 and all(r.index % 3 == i for r in recs)
        for r in recs:  # the shard's k-th attempt is the (k mod 4)-th of group k // 4
            k = (r.index - i) // 3
            assert r.instruction_generation.choice == k % 4
            start = i + 3 * (k // 4 * 4)
            assert r.instruction_generation.seed == derive_seed(42, start, "instruction")
    assert len({r.id for recs in shards for r in recs}) == 18
    # No sample of any machine shares a seed with another (choice j: seed + j).
    bodies = instruction_requests(srv)
    sample_seeds = [b["seed"] + j for b in bodies for j in range(b["n"])]
    assert len(set(sample_seeds)) == len(sample_seeds) == 4 * len(bodies)


@pytest.mark.parametrize("max_n", [1, 3])
def test_a_server_that_returns_fewer_choices(tmp_path: Path, max_n: int) -> None:
    out, rejects = tmp_path / "d.jsonl", tmp_path / "rejects.jsonl"
    with server(max_n=max_n) as srv:
        proc = run_magpie(
            *gen(srv.url, out, 6, "--seed", "8", "--samples-per-request", "4"),
            "--rejects",
            str(rejects),
        )
    assert proc.returncode == 0, proc.stderr
    recs = assert_exact(out, 6)
    assert all(r.instruction_generation.choice < max_n for r in recs)
    short = [json.loads(line) for line in rejects.read_text().splitlines()]
    short = [r for r in short if r["reject_reason"] == "short_batch"]
    assert short and all(r["index"] % 4 >= max_n for r in short)
    assert f"returned {max_n} of the 4 samples" in short[0]["reject_detail"]
    assert "short_batch" in proc.stderr.strip().splitlines()[-1]


def test_two_hosts_share_the_groups(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with server() as a, server() as b:
        proc = run_magpie(
            *gen([a.url, b.url], out, 16, "--seed", "2", "--no-dedup"),
            "--samples-per-request",
            "4",
        )
        bodies = instruction_requests(a) + instruction_requests(b)
        per_host = (len(instruction_requests(a)), len(instruction_requests(b)))
    assert proc.returncode == 0, proc.stderr
    recs = assert_exact(out, 16)
    assert len(bodies) == 4 and all(body["n"] == 4 for body in bodies)
    assert min(per_host) >= 1
    assert {r.host for r in recs} == {a.url, b.url}


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--backend", "ollama", "--samples-per-request", "4"], {}),
        (["--backend", "embedded", "--samples-per-request", "2"], {}),
        (["--samples-per-request", "4"], {}),  # auto never picks openai
        (["--backend", "embedded"], {"MAGPIE_SAMPLES_PER_REQUEST": "8"}),
    ],
)
def test_backends_without_n_refuse(args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    proc = run_magpie("generate", *args, "-n", "1", "-o", str(tmp_path / "d.jsonl"), env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--samples-per-request" in lines[0] and "openai" in lines[0]
    assert not (tmp_path / "d.jsonl").exists()


def test_bad_values_are_usage_errors(tmp_path: Path) -> None:
    for value in ("0", "33"):
        proc = run_magpie(
            "generate", "--backend", "openai", "--samples-per-request", value, "-n", "1"
        )
        assert proc.returncode == 2 and "samples_per_request" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- the library


async def _pipeline_run(
    url: str | list[str], target: int, start: int = 0, **settings: Any
) -> list[Record | Rejection]:
    urls = [url] if isinstance(url, str) else url
    backends = [OpenAIBackend(MODEL, u) for u in urls]
    backend = backends[0] if len(backends) == 1 else HostPool(backends)  # type: ignore[arg-type]
    try:
        info = await backend.describe()
        systems = settings.pop("systems", None)
        choices = [
            SystemChoice(name, weight, resolve_pre_query("chatml", info, text))
            for name, weight, text in systems or []
        ]
        pipeline = Pipeline(
            backend,
            resolve_pre_query("chatml", info, None),
            seed=21,
            settings=PipelineSettings(**settings),
            systems=choices or None,
        )
        return [r async for r in pipeline.run(target, start)]
    finally:
        await backend.aclose()


def test_every_resume_point_of_a_shard_gives_the_same_records(srv: OpenAITestServer) -> None:
    opts = {"samples_per_request": 4, "shard_index": 1, "shard_count": 3, "concurrency": 2}
    whole = asyncio.run(_pipeline_run(srv.url, 12, **opts))
    indexes = [r.index for r in whole]
    assert indexes == [1 + 3 * k for k in range(12)]
    for k in range(1, 9):  # every place in a group, twice
        tail = asyncio.run(_pipeline_run(srv.url, 12 - k, indexes[k], **opts))
        assert [r.model_dump(exclude={"created_at"}) for r in tail] == [
            r.model_dump(exclude={"created_at"}) for r in whole[k:]
        ]


def test_systems_schedules_and_turns_are_chosen_per_group(srv: OpenAITestServer) -> None:
    systems = [("a", 1.0, "You are A."), ("b", 1.0, "You are B.")]
    schedule = [(1.0, 1.0), (1.25, 0.99), (0.9, 0.95)]
    recs = asyncio.run(
        _pipeline_run(
            srv.url, 12, samples_per_request=3, systems=systems, schedule=schedule, turns=2
        )
    )
    assert all(isinstance(r, Record) for r in recs)
    groups: dict[int, list[Record]] = {}
    for r in recs:
        assert isinstance(r, Record)
        groups.setdefault(r.index // 3, []).append(r)
    for g, members in groups.items():
        assert len({(r.system_name, r.instruction_generation.temperature) for r in members}) == 1
        assert members[0].instruction_generation.temperature == schedule[(3 * g) % 3][0]
        # Turn 2 asks alone, with the record's own seed and its group's sampling.
        for r in members:
            turn2 = r.turn_generations[0]["instruction"]  # type: ignore[index]
            assert turn2.n is None and turn2.seed == derive_seed(21, r.index, "instruction:2")
            assert turn2.temperature == r.instruction_generation.temperature
    assert len({r.system_name for r in recs}) == 2  # both systems drawn over the groups
    bodies = instruction_requests(srv)
    assert sum(1 for b in bodies if b.get("n") == 3) == 4
    assert sum(1 for b in bodies if "n" not in b) == 12  # the follow-up questions


def test_pool_of_openai_servers_supports_n_and_a_mixed_one_does_not() -> None:
    a, b = OpenAIBackend(MODEL, "http://127.0.0.1:1"), OpenAIBackend(MODEL, "http://127.0.0.1:2")
    c = OllamaBackend("llama3.1", "http://127.0.0.1:3")
    assert a.supports_complete_n() and HostPool([a, b]).supports_complete_n()
    assert not c.supports_complete_n() and not HostPool([a, c]).supports_complete_n()
    pre_query = resolve_pre_query("chatml", ModelInfo(backend="ollama", model="llama3.1"))
    with pytest.raises(UsageError, match="--samples-per-request 2"):
        Pipeline(c, pre_query, seed=1, settings=PipelineSettings(samples_per_request=2))
    Pipeline(c, pre_query, seed=1)  # one sample per request works everywhere


def test_group_requests_never_exceed_what_is_needed(srv: OpenAITestServer) -> None:
    """A target inside a group: the last group is still one request; math holds."""
    recs = asyncio.run(_pipeline_run(srv.url, 10, samples_per_request=4, concurrency=16))
    assert len(recs) == 10 and all(isinstance(r, Record) for r in recs)
    assert len(instruction_requests(srv)) == math.ceil(10 / 4)
