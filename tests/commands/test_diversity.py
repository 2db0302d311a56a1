"""Diversity figures of ``magpie stats`` (issue 13): distinct-n, openings,
spreads and the mean pairwise cosine distance, checked against brute force."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, build_models, embedding_model
from samples import make_record

from magpie.commands.stats import compute_stats
from magpie.commands.stats.diversity import (
    DiversityCounter,
    mean_cosine_distance,
    opening,
    spread,
    words,
)
from magpie.store.jsonl import JsonlWriter


def test_distinct_n_and_openings_match_a_brute_force_count() -> None:
    texts = [
        "Can you help me plan a trip to Japan?",
        "Can you help me write a poem?",
        "What is the capital of France?",
        "can you HELP me plan a trip to Japan?",
        "How do I fix a leaking tap?",
    ]
    acc = DiversityCounter()
    for t in texts:
        acc.add(t)
    d = acc.result()
    uni = [w for t in texts for w in words(t)]
    bi = [p for t in texts for p in itertools.pairwise(words(t))]
    assert d.distinct_1 == len(set(uni)) / len(uni)
    assert d.distinct_2 == len(set(bi)) / len(bi)
    assert d.openings[0].value == "can you help" and d.openings[0].count == 3
    assert d.top_opening_share == 3 / 5 and d.distinct_openings == 3
    assert opening("I'm looking for a gift") == "i'm looking for"


def test_spread_entropy_and_evenness() -> None:
    from collections import Counter

    even = spread(Counter({"a": 5, "b": 5, "c": 5, "d": 5}))
    assert even is not None and even.entropy_bits == 2.0 and even.evenness == 1.0
    skew = spread(Counter({"a": 97, "b": 1, "c": 1, "d": 1}))
    p = [0.97, 0.01, 0.01, 0.01]
    assert skew is not None
    assert math.isclose(skew.entropy_bits or 0, -sum(x * math.log2(x) for x in p), abs_tol=1e-4)
    assert (skew.evenness or 0) < 0.15 and skew.top[0].value == "a"
    one = spread(Counter({"a": 3}))
    assert one is not None and one.evenness is None and one.entropy_bits == 0
    assert spread(Counter()) is None


def test_mean_cosine_distance_is_the_mean_over_pairs() -> None:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(30, 8))
    texts = [str(i) for i in range(30)]

    def embed(batch: list[str]) -> list[list[float]]:
        return [list(vecs[int(t)]) for t in batch]

    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    brute = np.mean([1 - unit[i] @ unit[j] for i in range(30) for j in range(30) if i != j])
    assert math.isclose(mean_cosine_distance(texts, embed) or 0, brute, rel_tol=1e-9)
    same = mean_cosine_distance(["0", "0", "0"], embed)
    assert same is not None and abs(same) < 1e-12
    assert mean_cosine_distance(["0"], embed) is None


def test_stats_reports_diversity_with_an_embedding_model(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    texts = [
        "Explain how tidal forces shape distant planetary orbits",
        "Explain how tidal forces shape nearby planetary orbits",
        "Suggest quick vegetarian dinners using seasonal autumn produce",
        "Compare solar panels with wind turbines for rural farms",
    ]
    with JsonlWriter(path) as w:
        for i, t in enumerate(texts):
            rec = make_record(i, instruction=t)
            rec = rec.model_copy(update={"persona": "a pilot" if i % 2 else "a chef"})
            w.write(rec)
    plain = compute_stats(path).diversity
    assert plain.mean_cosine_distance is None and plain.instructions == 4
    assert plain.personas is not None and plain.personas.distinct == 2
    assert plain.personas.evenness == 1.0
    engine = ScriptedEngine()
    with OllamaTestServer(build_models([], engine) + [embedding_model("nomic-embed-text")]) as srv:
        proc = run_magpie(
            "stats",
            str(path),
            "--json",
            "--semantic-model",
            "nomic-embed-text",
            "--semantic-host",
            srv.url,
        )
        embeds = srv.requests_to("/api/embed")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)["diversity"]
    assert d["embedding_model"] == "nomic-embed-text" and d["embedded"] == 4
    assert 0 < d["mean_cosine_distance"] <= 2
    assert embeds and sorted(embeds[0].body["input"]) == sorted(texts)
    table = run_magpie("stats", str(path))
    assert "Diversity of instructions" in table.stdout and "distinct-2" in table.stdout
    down = run_magpie(
        "stats", str(path), "--semantic-model", "nomic-embed-text", "--semantic-host", srv.url
    )
    assert down.returncode == 3 and len(down.stderr.strip().splitlines()) == 1
