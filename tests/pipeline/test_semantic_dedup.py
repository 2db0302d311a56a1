"""Semantic dedup from the command line (``--semantic-model``): the backends'
embedding calls, :mod:`magpie.pipeline.stages.dedup.embeddings`, and ``generate``, ``dedup`` and
``merge`` end to end, through real HTTP and the real clients against the test
servers, whose embeddings are a bag of words (tests/support/ollama_server.py): the same
words in another order are a semantic duplicate that exact and near dedup miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import MODEL, assert_exact, gen_args, json_lines, manifest_of, read_records
from magpie_cli import run_magpie
from ollama_server import (
    Delay,
    Hold,
    HttpError,
    OllamaTestServer,
    ScriptedEngine,
    _instruction,
    build_models,
    embedding_model,
    word_embedding,
)
from openai_server import OpenAITestServer, ServedModel
from samples import make_record

from conftest import CLOSED_PORT
from magpie.backends.ollama import OllamaBackend
from magpie.backends.openai import OpenAIBackend
from magpie.backends.pool import HostPool
from magpie.backends.retry import RetryPolicy
from magpie.commands.generate import agenerate, prepare
from magpie.commands.merge import merge_files
from magpie.errors import ModelNotFound
from magpie.pipeline.scheduler import Pipeline, PipelineSettings
from magpie.pipeline.stages.dedup.cache import cache_path
from magpie.pipeline.stages.dedup.embeddings import BackendEmbedder
from magpie.pipeline.stages.dedup.index import DedupIndex
from magpie.records import Record, Rejection
from magpie.settings import build_config
from magpie.store.jsonl import JsonlWriter

EMBED = "nomic-embed-text"
OTHER_EMBED = "mxbai-embed-large"
FAST = RetryPolicy(backoff_base=0.01, backoff_max=0.05)

#: Four instructions; each is asked for in one of four word orders.
WORD_SETS = [
    "Explain how tidal forces shape distant planetary orbits",
    "Describe why ancient bridges survive heavy winter storms",
    "Compare solar panels with wind turbines for rural farms",
    "Suggest quick vegetarian dinners using seasonal autumn produce",
]
ORDERS = [
    lambda w: w,
    lambda w: w[::-1],
    lambda w: w[1::2] + w[0::2],
    lambda w: w[len(w) // 2 :] + w[: len(w) // 2][::-1],
]


def reorder(i: int, order: int) -> str:
    return " ".join(ORDERS[order](WORD_SETS[i].split())) + "?"


def words(text: str) -> frozenset[str]:
    return frozenset(text.lower().strip("?").split())


def reordered(source, options):  # type: ignore[no-untyped-def]
    """The scripted engine's text: an answer to a chat, else one of the four
    instructions in one of four word orders (by the request's seed)."""
    if isinstance(source, list):
        return "Here is a short answer about " + source[-1]["content"][:40]
    h = int(hashlib.blake2b(str(options.get("seed")).encode(), digest_size=4).hexdigest(), 16)
    return reorder(h % len(WORD_SETS), (h >> 8) % len(ORDERS))


def ollama(text_fn=reordered, embed_models=(EMBED,)) -> OllamaTestServer:  # type: ignore[no-untyped-def]
    engine = ScriptedEngine(text_fn=text_fn)
    models = build_models(["llama3.1"], engine) + [embedding_model(n) for n in embed_models]
    return OllamaTestServer(models)


def write_records(path: Path, texts: list[str], start: int = 0) -> list[str]:
    records = [make_record(start + i, instruction=t) for i, t in enumerate(texts)]
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
    return [r.id for r in records]


def semantic_rejects(path: Path) -> list[dict]:
    return [
        r
        for r in json_lines(path.read_text())
        if r["reject_reason"] == "duplicate" and "semantic duplicate of" in r["reject_detail"]
    ]


# -- the fixtures themselves ----------------------------------------------------------


def test_reordered_words_are_only_semantic_duplicates() -> None:
    index = DedupIndex(embed=lambda ts: [word_embedding(t) for t in ts], ann="numpy")
    index.add("a", reorder(0, 0))
    for order in (1, 2, 3):
        dup = index.check(reorder(0, order))
        assert dup is not None and dup.kind == "semantic" and dup.similarity > 0.999
        assert index.check(reorder(0, order), semantic=False) is None  # MinHash misses it
    assert index.check(reorder(1, 0)) is None


# -- the backends' embed and the embedder -------------------------------------------------


def test_ollama_embed_batches_in_order_and_closes() -> None:
    texts = [f"text number {i} about {WORD_SETS[i % 4]}" for i in range(150)]
    with ollama() as srv:
        embedder = BackendEmbedder(lambda: OllamaBackend(EMBED, srv.url), retry=FAST)
        assert embedder.backend is not None and embedder.backend.supports_embed()
        thread = embedder._thread
        assert embedder.probe() == 256
        vectors = embedder(texts)
        sizes = [len(r.body["input"]) for r in srv.requests_to("/api/embed")]
        bodies = [r.body for r in srv.requests_to("/api/embed")]
        embedder.close()
    assert vectors == [word_embedding(t) for t in texts]
    assert sizes == [1, 64, 64, 22]  # the probe, then batches of 64
    assert all(b["model"] == EMBED and b["truncate"] is True for b in bodies)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        embedder(["late"])
    embedder.close()  # idempotent


def test_embed_errors_map_and_retries_come_from_magpie_retry() -> None:
    with ollama() as srv:
        srv.inject(HttpError(503, "server busy"), times=1, path="/api/embed")
        retries: list[str] = []
        with BackendEmbedder(
            lambda: OllamaBackend(EMBED, srv.url), retry=FAST, on_retry=retries.append
        ) as embedder:
            assert embedder(["hello world"]) == [word_embedding("hello world")]
        assert retries == ["http_503"]
        missing = BackendEmbedder(lambda: OllamaBackend("nope-embed", srv.url), retry=FAST)
        with missing, pytest.raises(ModelNotFound, match="ollama pull nope-embed"):
            missing(["x"])


def test_openai_embeddings_sorted_by_index_and_pool() -> None:
    models = [ServedModel("gen", ScriptedEngine()), ServedModel(EMBED, ScriptedEngine())]
    texts = ["alpha beta", "gamma", "beta alpha", "delta epsilon"]
    with OpenAITestServer(models) as a, OpenAITestServer(models) as b:

        async def run() -> tuple[list[list[float]], list[list[float]]]:
            single = OpenAIBackend(EMBED, a.url)
            pool = HostPool([OpenAIBackend(EMBED, a.url), OpenAIBackend(EMBED, b.url)])
            try:
                assert pool.supports_embed()
                return await single.embed(texts), await pool.embed(texts)
            finally:
                await single.aclose()
                await pool.aclose()

        one, pooled = asyncio.run(run())
        body = a.requests_to("/v1/embeddings")[0].body
    expected = [word_embedding(t) for t in texts]
    assert one == expected and pooled == expected  # the server sends data in reverse
    assert body == {"model": EMBED, "input": texts, "encoding_format": "float"}

    async def missing() -> None:
        backend = OpenAIBackend("nope-embed", a.url)
        try:
            await backend.embed(["x"])
        finally:
            await backend.aclose()

    with OpenAITestServer(models) as a, pytest.raises(ModelNotFound, match="embedding model"):
        asyncio.run(missing())


def test_semantic_target_defaults() -> None:
    cfg = build_config({"semantic_model": EMBED, "host": "http://gen:11434"}, environ={})
    assert cfg.semantic_target("ollama") == ("ollama", "http://gen:11434")
    assert cfg.semantic_target("embedded") == ("ollama", None)  # Ollama's default host
    cfg = build_config({"backend": "openai", "host": "http://vllm:8000"}, environ={})
    assert cfg.semantic_target("openai") == ("openai", "http://vllm:8000")
    cfg = build_config({"semantic_backend": "ollama", "backend": "openai"}, environ={})
    assert cfg.semantic_target("openai") == ("ollama", None)
    cfg = build_config({"semantic_host": "http://emb:11434"}, environ={})
    assert cfg.semantic_target() == ("ollama", "http://emb:11434")


# -- magpie generate ----------------------------------------------------------------


def test_generate_rejects_a_reordered_paraphrase_as_semantic(tmp_path: Path) -> None:
    out, rej = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    plain = tmp_path / "plain.jsonl"
    with ollama() as srv:
        args = ("--seed", "5", "--rejects", str(rej), "--semantic-model", EMBED)
        proc = run_magpie(*gen_args(srv, out, 4, *args))
        assert proc.returncode == 0, proc.stderr
        embeds = srv.requests_to("/api/embed")
        # Without semantic dedup the same run keeps paraphrases.
        control = run_magpie(*gen_args(srv, plain, 4, "--seed", "5"))
        assert control.returncode == 0, control.stderr
    recs = assert_exact(out, 4)
    assert len({words(r.instruction) for r in recs}) == 4  # one record per word set
    semantic = semantic_rejects(rej)
    assert semantic, "no paraphrase was rejected as a semantic duplicate"
    kept = {words(r.instruction) for r in recs}
    assert all(words(r["instruction"]) in kept for r in semantic)
    assert len({words(r.instruction) for r in read_records(plain)}) < 4
    # (a request cancelled at the end of the run may have sent no body)
    assert embeds and all(r.body["model"] == EMBED for r in embeds if r.body is not None)
    settings = manifest_of(out).settings
    assert settings["semantic_model"] == EMBED and settings["semantic_threshold"] == 0.95
    with np.load(cache_path(out)) as data:
        assert data["vectors"].shape == (4, 256)
    assert "duplicate" in proc.stderr.splitlines()[-1]


def test_generate_semantic_through_the_openai_backend(tmp_path: Path) -> None:
    out, rej = tmp_path / "d.jsonl", tmp_path / "r.jsonl"
    models = [
        ServedModel("smol", ScriptedEngine(text_fn=reordered)),
        ServedModel(EMBED, ScriptedEngine()),
    ]
    with OpenAITestServer(models) as srv:
        proc = run_magpie(
            "generate",
            "--backend",
            "openai",
            "--host",
            srv.url,
            "--model",
            "smol",
            "--template",
            "smollm2",
            "-n",
            "4",
            "--seed",
            "5",
            "-o",
            str(out),
            "--rejects",
            str(rej),
            "--semantic-model",
            EMBED,
            "--backoff-base",
            "0.05",
        )
        embeds = srv.requests_to("/v1/embeddings")
    assert proc.returncode == 0, proc.stderr
    recs = assert_exact(out, 4)
    assert len({words(r.instruction) for r in recs}) == 4
    assert semantic_rejects(rej)
    # (a request cancelled at the end of the run may have sent no body)
    assert embeds and all(r.body["model"] == EMBED for r in embeds if r.body is not None)


def test_index_is_rebuilt_when_the_embedding_model_changes(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with ollama(embed_models=(EMBED, OTHER_EMBED)) as srv:
        first = run_magpie(*gen_args(srv, out, 2, "--seed", "5", "--semantic-model", EMBED))
        assert first.returncode == 0, first.stderr
        old = [r.instruction for r in read_records(out)]
        srv.clear_requests()
        second = run_magpie(*gen_args(srv, out, 3, "--semantic-model", OTHER_EMBED))
        assert second.returncode == 0, second.stderr
        rebuilt = [r.body for r in srv.requests_to("/api/embed")]
        srv.clear_requests()
        third = run_magpie(*gen_args(srv, out, 4, "--semantic-model", OTHER_EMBED))
        assert third.returncode == 0, third.stderr
        reused = [r.body for r in srv.requests_to("/api/embed")]
    assert {"model": OTHER_EMBED, "input": old} in [
        {"model": b["model"], "input": b["input"]} for b in rebuilt
    ]
    assert all(len(b["input"]) == 1 for b in reused)  # the cache holds the new model's vectors
    assert manifest_of(out).settings["semantic_model"] == OTHER_EMBED
    assert_exact(out, 4)


def test_unknown_embedding_model_and_unreachable_server_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    with ollama() as srv:
        missing = run_magpie(*gen_args(srv, out, 2, "--semantic-model", "nope-embed"))
        down = run_magpie(
            *gen_args(
                srv,
                out,
                2,
                "--semantic-model",
                EMBED,
                "--semantic-host",
                f"http://127.0.0.1:{CLOSED_PORT}",
            )
        )
        chats = srv.requests_to("/api/chat")
    assert missing.returncode == 3, missing.stderr
    assert "ollama pull nope-embed" in missing.stderr and "Traceback" not in missing.stderr
    assert down.returncode == 3 and "not reachable" in down.stderr, down.stderr
    assert [line for line in missing.stderr.splitlines() if line.startswith("magpie: error:")]
    assert not out.exists() and not chats  # nothing generated, nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--no-dedup", "--semantic-model", EMBED], "needs dedup"),
        (["generate", "--semantic-model", EMBED, "--semantic-threshold", "1.5"], "semantic"),
        (["generate", "--semantic-model", EMBED, "--semantic-threshold", "0"], "semantic"),
        (["generate", "--semantic-model", EMBED, "--semantic-backend", "vllm"], "semantic"),
        (["generate", "--semantic-model", EMBED, "--semantic-host", "no url"], "--semantic-host"),
        (
            [
                "dedup",
                "in.jsonl",
                "-o",
                "o.jsonl",
                "--semantic-model",
                EMBED,
                "--semantic-threshold",
                "2",
            ],
            "semantic_threshold",
        ),  # fmt: skip
        (
            ["merge", "in.jsonl", "-o", "o.jsonl", "--no-dedup", "--semantic-model", EMBED],
            "needs dedup",
        ),  # fmt: skip
    ],
)
def test_bad_semantic_settings_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    write_records(tmp_path / "in.jsonl", ["a question about the sea"])
    proc = run_magpie(*args, "-n", "1") if args[0] == "generate" else run_magpie(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_never_waits_for_an_embedding_on_its_event_loop(tmp_path: Path) -> None:
    """One instruction's embedding is held by the server; the other pairs go on
    (their answers are asked for meanwhile), and the held request is released
    only by them."""
    hold = Hold(timeout=30.0)
    answered_while_held: list[str] = []

    def text_fn(source, options):  # type: ignore[no-untyped-def]
        if isinstance(source, list):
            if hold.holding.is_set():
                answered_while_held.append(source[-1]["content"])
                if len(answered_while_held) >= 3:
                    hold.release.set()
            return "Here is a short answer."
        return _instruction(int(options.get("seed") or 0) % 100_000)

    out = tmp_path / "d.jsonl"
    with ollama(text_fn=text_fn) as srv:
        srv.inject(Delay(0.0), times=1, path="/api/embed")  # the start-up probe goes through
        srv.inject(hold, times=1, path="/api/embed")  # the first instruction's embedding waits
        proc = run_magpie(
            *gen_args(srv, out, 8, "--seed", "3", "-c", "4", "--semantic-model", EMBED)
        )
    assert proc.returncode == 0, proc.stderr
    assert len(answered_while_held) >= 3, "the pairs stopped while an embedding was pending"
    assert_exact(out, 8)


def test_the_pipeline_embeds_off_its_loop_and_a_rebuild_through_the_sync_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []
    sync_call = BackendEmbedder.__call__
    async_call = BackendEmbedder.aembed

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def recording_call(self, texts):  # type: ignore[no-untyped-def]
        calls.append(("sync", on_loop()))
        return sync_call(self, texts)

    async def recording_aembed(self, texts):  # type: ignore[no-untyped-def]
        calls.append(("async", threading.current_thread() is threading.main_thread()))
        return await async_call(self, texts)

    monkeypatch.setattr(BackendEmbedder, "__call__", recording_call)
    monkeypatch.setattr(BackendEmbedder, "aembed", recording_aembed)
    out = tmp_path / "d.jsonl"
    with ollama() as srv:

        def config(n: int):  # type: ignore[no-untyped-def]
            flags = {
                "num": n,
                "output": str(out),
                "model": MODEL,
                "host": srv.url,
                "seed": 5,
                "semantic_model": EMBED,
                "backoff_base": 0.05,
                "quiet": True,
            }
            return build_config(flags, environ={})

        first = asyncio.run(agenerate(config(3)))
        assert first.error is None and first.stats.written == 3
        assert not [c for c in calls if c[0] == "sync"]  # generation used aembed only
        cache_path(out).unlink()  # stale: the next run rebuilds it, embedding 3 records
        calls.clear()
        second = asyncio.run(agenerate(config(4)))
        assert second.error is None
        rebuild = [r.body for r in srv.requests_to("/api/embed") if len(r.body["input"]) == 3]
    assert rebuild, "the index was not rebuilt through the embedder"
    assert ("sync", False) in calls and ("sync", True) not in calls
    assert ("async", True) in calls  # the pipeline awaited its embeddings


def test_a_plain_embed_function_runs_off_the_pipelines_loop() -> None:
    threads: list[str] = []

    def embed(texts: list[str]) -> list[list[float]]:
        threads.append(threading.current_thread().name)
        return [word_embedding(t) for t in texts]

    async def run(url: str) -> list[Record | Rejection]:
        prep = await prepare(build_config({"model": MODEL, "host": url}, environ={}))
        try:
            index = DedupIndex(embed=embed, ann="numpy")
            settings = PipelineSettings(concurrency=2)
            pipeline = Pipeline(
                prep.backend, prep.pre_query, seed=5, settings=settings, dedup=index
            )
            return [r async for r in pipeline.run(4)]
        finally:
            await prep.backend.aclose()

    with ollama() as srv:
        results = asyncio.run(run(srv.url))
    records = [r for r in results if isinstance(r, Record)]
    assert len(records) == 4 and len({words(r.instruction) for r in records}) == 4
    assert any(isinstance(r, Rejection) and "semantic" in r.detail for r in results)
    assert threads and all(name.startswith("magpie-embed") for name in threads)


# -- magpie dedup and magpie merge ----------------------------------------------------------


def test_dedup_command_with_semantic_model(tmp_path: Path) -> None:
    texts = [reorder(0, 0), reorder(1, 0), reorder(0, 1), reorder(2, 2), reorder(1, 3)]
    ids = write_records(tmp_path / "in.jsonl", texts)
    with ollama() as srv:
        plain = run_magpie("dedup", "in.jsonl", "-o", "plain.jsonl")
        proc = run_magpie(
            "dedup",
            "in.jsonl",
            "-o",
            "out.jsonl",
            "--rejects",
            "rej.jsonl",
            env={"MAGPIE_SEMANTIC_MODEL": EMBED, "OLLAMA_HOST": srv.url},
        )
        missing = run_magpie(
            "dedup",
            "in.jsonl",
            "-o",
            "never.jsonl",
            "--semantic-model",
            "nope-embed",
            "--semantic-host",
            srv.url,
        )
    assert plain.returncode == 0 and len(json_lines((tmp_path / "plain.jsonl").read_text())) == 5
    assert proc.returncode == 0, proc.stderr
    kept = json_lines((tmp_path / "out.jsonl").read_text())
    assert [r["id"] for r in kept] == [ids[0], ids[1], ids[3]]
    dropped = json_lines((tmp_path / "rej.jsonl").read_text())
    assert [(r["id"], r["duplicate_of"], r["duplicate_kind"]) for r in dropped] == [
        (ids[2], ids[0], "semantic"),
        (ids[4], ids[1], "semantic"),
    ]
    assert "2 semantic" in proc.stderr
    with np.load(cache_path(tmp_path / "out.jsonl")) as data:
        assert data["vectors"].shape == (3, 256)
    assert missing.returncode == 3 and "ollama pull nope-embed" in missing.stderr
    assert not (tmp_path / "never.jsonl").exists()


def test_merge_with_semantic_model(tmp_path: Path) -> None:
    a_ids = write_records(tmp_path / "a.jsonl", [reorder(0, 0), reorder(1, 0)])
    b_ids = write_records(tmp_path / "b.jsonl", [reorder(0, 2), reorder(3, 1)], start=10)
    with ollama() as srv:
        proc = run_magpie(
            "merge",
            "a.jsonl",
            "b.jsonl",
            "-o",
            "all.jsonl",
            "--rejects",
            "rej.jsonl",
            "--semantic-model",
            EMBED,
            "--semantic-host",
            srv.url,
        )
        # The library function with any embed function.
        report = merge_files(
            [tmp_path / "a.jsonl", tmp_path / "b.jsonl"],
            tmp_path / "lib.jsonl",
            embed=lambda ts: [word_embedding(t) for t in ts],
            embed_name="bow",
        )
    assert proc.returncode == 0, proc.stderr
    kept = [r["id"] for r in json_lines((tmp_path / "all.jsonl").read_text())]
    assert kept == [a_ids[0], a_ids[1], b_ids[1]]
    dropped = json_lines((tmp_path / "rej.jsonl").read_text())
    assert [(r["id"], r["duplicate_kind"]) for r in dropped] == [(b_ids[0], "semantic")]
    assert "1 semantic" in proc.stderr
    merge = manifest_of(tmp_path / "all.jsonl").merge
    assert merge is not None
    assert merge["settings"]["semantic_model"] == EMBED
    assert merge["counts"]["semantic"] == 1
    assert report.semantic == 1 and report.semantic_model == "bow"


@pytest.mark.slow
def test_the_embedded_model_still_loads_after_the_vector_index(tmp_path: Path) -> None:
    """usearch links its own libstdc++; imported before llama.cpp has loaded a
    vocabulary, it made every later model load fail (std::bad_cast), so a
    semantic run on the embedded backend could not load its model.  A fresh
    process, as a user's run is."""
    pytest.importorskip("usearch")
    pytest.importorskip("llama_cpp")
    script = (
        "from magpie.pipeline.stages.dedup.vectors import _VectorIndex\n"
        "index = _VectorIndex(8)\n"
        "assert index._usearch is not None, 'usearch was not used'\n"
        "from magpie.backends.llamacpp.model import EmbeddedBackend\n"
        "llm = EmbeddedBackend(n_ctx=256).llm\n"
        "print(llm.n_vocab())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) > 1000
