"""Dedup: exact, near and semantic duplicates, the persistent index next to an
output, and ``dedup_file`` on a JSONL file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import string
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import LONG, LONG_CHANGED, SAME_TEMPLATE, UNRELATED, make_record

from magpie.commands.dedup import dedup_file
from magpie.errors import MagpieError, UsageError
from magpie.pipeline.stages.dedup.cache import cache_path
from magpie.pipeline.stages.dedup.index import DedupCounts, DedupIndex, Duplicate
from magpie.pipeline.stages.dedup.minhash import BATCH, MinHasher, lsh_params, normalize
from magpie.store.jsonl import JsonlWriter


def write_output(path: Path, instructions: list[str], start: int = 0) -> list[str]:
    """Append one record per instruction; return their ids."""
    recs = [make_record(start + i, instruction=t) for i, t in enumerate(instructions)]
    with JsonlWriter(path) as w:
        for r in recs:
            w.write(r)
    return [r.id for r in recs]


def bow_embed(texts: list[str]) -> list[list[float]]:
    """A deterministic fake embedding: hashed bag of words, 64 dimensions."""
    out = []
    for text in texts:
        vec = [0.0] * 64
        for word in re.findall(r"\w+", text.casefold()):
            h = hashlib.blake2b(word.encode(), digest_size=4).digest()
            vec[h[0] % 64] += 1.0 if h[1] & 1 else -1.0
        out.append(vec)
    return out


class CountingEmbed:
    def __init__(self) -> None:
        self.texts = 0
        self.calls = 0

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        self.texts += len(texts)
        return bow_embed(texts)


# -- normalization and hashing -------------------------------------------------


def test_normalize() -> None:
    assert normalize("  What IS\tthe capital\n of France?!  ") == "what is the capital of france"
    assert normalize("«Ｈｅｌｌｏ», world…") == "hello», world"  # NFKC; only the ends stripped
    assert normalize("Straße") == normalize("STRASSE")  # casefold, not lower
    assert normalize("a, b. c") == "a, b. c"  # inner punctuation stays
    assert normalize("?!. ") == ""


def test_signatures_equal_datasketch() -> None:
    datasketch = pytest.importorskip("datasketch")
    hasher = MinHasher(num_perm=64)
    texts = [normalize(t) for t in [LONG, LONG_CHANGED, "short", "", "日本語のテキストです"]]
    sigs = hasher.signatures(texts)
    for text, sig in zip(texts, sigs, strict=True):
        ref = datasketch.MinHash(num_perm=64, seed=1, hashfunc=int, scheme="affine32")
        ref.update_batch(hasher.shingle_hashes(text).tolist())
        assert np.array_equal(ref.hashvalues, sig)
    assert np.array_equal(datasketch.MinHash(num_perm=64, seed=1).permutations, hasher.permutations)


def test_signatures_batch_equals_single_and_long_texts() -> None:
    hasher = MinHasher()
    texts = [normalize(t) for t in [LONG, "x", "", "ab" * 3000, *UNRELATED]]
    batch = hasher.signatures(texts)
    for text, sig in zip(texts, batch, strict=True):
        assert np.array_equal(hasher.signatures([text])[0], sig)


def test_lsh_params_equal_datasketch() -> None:
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold in (0.5, 0.7, 0.8, 0.9):
        for weights in ((0.5, 0.5), (0.2, 0.8)):
            assert lsh_params(threshold, 128, weights) == lsh._optimal_param(
                threshold, 128, *weights
            )


# -- exact and near duplicates -----------------------------------------------


def test_exact_duplicates() -> None:
    index = DedupIndex()
    assert index.check_and_add("a", "What is the capital of France?") is None
    for variant in (
        "what is the capital of france",
        "  WHAT   is the capital\nof France ?!",
        "«What is the capital of France?»",
        "Ｗｈａｔ is the capital of France?",
    ):
        assert index.check(variant) == Duplicate("exact", "a", 1.0)
    assert len(index) == 1


def test_near_duplicate_one_word_changed() -> None:
    index = DedupIndex()
    assert len(LONG.split()) == 20
    assert index.check_and_add("a", LONG) is None
    dup = index.check_and_add("b", LONG_CHANGED)
    assert dup is not None and dup.kind == "near" and dup.of_id == "a"
    assert index.threshold <= dup.similarity < 1.0
    # A word inserted, a typo: still near duplicates.
    for variant in (LONG.replace("in plants", "in green plants"), LONG.replace("works", "wroks")):
        found = index.check(variant)
        assert found is not None and found.kind == "near" and found.of_id == "a"
    assert len(index) == 1


def test_unrelated_and_same_template_are_kept() -> None:
    index = DedupIndex()
    texts = [
        LONG,
        *UNRELATED,
        *SAME_TEMPLATE,
        # Short texts differing in one content word are different questions.
        "What is the capital city of France?",
        "What is the capital city of Germany?",
    ]
    assert [index.check_and_add(str(i), t) for i, t in enumerate(texts)] == [None] * len(texts)
    assert len(index) == len(texts)


def test_check_is_read_only_and_returns_the_best_match() -> None:
    index = DedupIndex()
    index.add("a", UNRELATED[0])
    index.add("b", LONG)
    assert index.check(LONG_CHANGED) is not None
    assert index.check(LONG_CHANGED) is not None
    assert len(index) == 2
    index.add("c", LONG_CHANGED)  # add() does not check
    assert len(index) == 3
    assert index.check(LONG_CHANGED) == Duplicate("exact", "c", 1.0)


def test_threshold_is_configurable() -> None:
    strict = DedupIndex(threshold=0.99)
    strict.add("a", LONG)
    assert strict.check(LONG_CHANGED) is None
    loose = DedupIndex(threshold=0.3, num_perm=64)
    loose.add("a", SAME_TEMPLATE[0])
    dup = loose.check(SAME_TEMPLATE[1])
    assert dup is not None and dup.kind == "near"
    for bad in ({"threshold": 0.0}, {"threshold": 1.5}, {"num_perm": 1}):
        with pytest.raises(UsageError):
            DedupIndex(**bad)


def test_discard_forgets_a_record() -> None:
    index = DedupIndex()
    index.add("a", LONG)
    index.add("b", LONG)
    assert index.discard("a") and not index.discard("zzz")
    assert index.check(LONG) == Duplicate("exact", "b", 1.0)
    assert index.discard("b")
    assert index.check(LONG) is None and index.check(LONG_CHANGED) is None
    assert len(index) == 0


def test_batch_gives_the_same_decisions_as_one_by_one() -> None:
    texts = [LONG, LONG_CHANGED, LONG.upper(), *UNRELATED, UNRELATED[1] + " Thanks!", LONG]
    items = [(f"id{i}", t) for i, t in enumerate(texts)]
    one = DedupIndex()
    expected = [one.check_and_add(i, t) for i, t in items]
    many = DedupIndex()
    assert many.check_and_add_many(items) == expected
    assert [d.kind if d else None for d in expected] == [
        None,
        "near",
        "exact",
        None,
        None,
        None,
        None,
        "near",
        "exact",
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["hello world", "what is x", "Sort a list", "naïve café"]),
            st.sampled_from(["", "?", "!", " .", "..."]),
            st.booleans(),
            st.sampled_from(["", " ", "  \n"]),
        ),
        max_size=30,
    )
)
def test_never_keeps_two_exact_normalized_equal_texts(parts: list) -> None:
    index = DedupIndex()
    kept: list[str] = []
    for i, (core, punct, upper, space) in enumerate(parts):
        text = space + (core.upper() if upper else core) + punct + space
        if index.check_and_add(str(i), text) is None:
            kept.append(normalize(text))
    assert len(kept) == len(set(kept))
    assert len(index) == len(kept)


# -- semantic duplicates -----------------------------------------------------

REORDERED = (
    "How do I bake sourdough bread at home without a stand mixer?",
    "Without a stand mixer, at home: how do I bake sourdough bread?",
)


@pytest.mark.parametrize("ann", ["numpy", "usearch"])
def test_semantic_duplicates(ann: str) -> None:
    if ann == "usearch":
        pytest.importorskip("usearch")
    assert DedupIndex().check_and_add("a", REORDERED[0]) is None
    lexical = DedupIndex()
    lexical.add("a", REORDERED[0])
    assert lexical.check(REORDERED[1]) is None  # too different for MinHash
    embed = CountingEmbed()
    index = DedupIndex(embed=embed, ann=ann)
    assert index.check_and_add("a", REORDERED[0]) is None
    assert [index.check_and_add(str(i), t) for i, t in enumerate(UNRELATED)] == [None] * 4
    dup = index.check_and_add("b", REORDERED[1])
    assert dup is not None and dup.kind == "semantic" and dup.of_id == "a"
    assert dup.similarity == pytest.approx(1.0, abs=1e-5)
    assert len(index) == 5
    # Exact and near duplicates are found without embedding them.
    before = embed.texts
    assert index.check(REORDERED[0].upper()).kind == "exact"  # type: ignore[union-attr]
    assert embed.texts == before
    # check() then add() of the same text embeds it once.
    index.check("A completely new question about volcanoes?")
    index.add("c", "A completely new question about volcanoes?")
    assert embed.texts == before + 1


def test_semantic_threshold_and_bad_embeddings() -> None:
    close = "Without a mixer, at home: how do I bake sourdough bread?"  # "stand" dropped
    assert DedupIndex().check_and_add("a", REORDERED[0]) is None
    strict = DedupIndex(embed=bow_embed, semantic_threshold=1.0, ann="numpy")
    strict.add("a", REORDERED[0])
    assert strict.check(close) is None
    loose = DedupIndex(embed=bow_embed, semantic_threshold=0.8, ann="numpy")
    loose.add("a", REORDERED[0])
    dup = loose.check(close)
    assert dup is not None and dup.kind == "semantic" and 0.8 <= dup.similarity < 1.0
    with pytest.raises(MagpieError, match="embedding"):
        DedupIndex(embed=lambda texts: [[1.0, 2.0]] * (len(texts) + 1)).check("x")


# -- persistence next to an output ------------------------------------------


def test_index_persists_across_runs(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    ids = write_output(out, [LONG, *UNRELATED])
    index = DedupIndex.open(out)
    assert index.source == "rebuilt" and len(index) == 5
    index.save(out)
    assert cache_path(out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    again = DedupIndex.open(out)
    assert again.source == "cache" and len(again) == 5
    dup = again.check(LONG_CHANGED)
    assert dup is not None and dup.kind == "near" and dup.of_id == ids[0]
    # A nightly top-up: the new record is written, then the index saved.
    assert again.check_and_add("new", "Explain the rules of chess to a beginner.") is None
    write_output(out, ["Explain the rules of chess to a beginner."], start=5)
    again.save(out)
    third = DedupIndex.open(out)
    assert third.source == "cache" and len(third) == 6
    assert third.check("explain the rules of chess to a beginner") is not None


def test_missing_or_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    ids = write_output(out, [LONG, *UNRELATED])
    assert DedupIndex.open(out).source == "rebuilt"  # never saved
    DedupIndex.open(out).save(out)
    cache_path(out).unlink()
    index = DedupIndex.open(out)
    assert index.source == "rebuilt" and index.check(LONG_CHANGED).of_id == ids[0]  # type: ignore[union-attr]
    cache_path(out).write_bytes(b"not a zip file")
    index = DedupIndex.open(out)
    assert index.source == "rebuilt" and len(index) == 5


def test_stale_index_is_rebuilt_from_the_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    write_output(out, [*UNRELATED])
    DedupIndex.open(out).save(out)
    # A crash after writing a record, before saving the index.
    new_ids = write_output(out, [LONG], start=4)
    index = DedupIndex.open(out)
    assert index.source == "rebuilt" and len(index) == 5
    assert index.check(LONG_CHANGED).of_id == new_ids[0]  # type: ignore[union-attr]
    # The output replaced by other records: the old ones are gone from the index.
    out.unlink()
    write_output(out, [UNRELATED[0]])
    index = DedupIndex.open(out)
    assert index.source == "rebuilt" and len(index) == 1
    assert index.check(LONG) is None


def test_rebuild_reuses_cached_embeddings(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    write_output(out, [LONG, *UNRELATED])
    first = CountingEmbed()
    DedupIndex.open(out, embed=first, embed_name="bow", ann="numpy").save(out)
    assert first.texts == 5
    write_output(out, ["A brand new question about tides."], start=5)
    again = CountingEmbed()
    index = DedupIndex.open(out, embed=again, embed_name="bow", ann="numpy")
    assert index.source == "rebuilt" and again.texts == 1
    assert index.check(REORDERED[0]) is None
    index.save(out)
    cached = CountingEmbed()
    index = DedupIndex.open(out, embed=cached, embed_name="bow")
    assert index.source == "cache" and cached.texts == 0
    dup = index.check("Tides: a brand new question about?")
    assert dup is not None and dup.kind == "semantic"
    # Another embedding model: its vectors are computed afresh.
    other = CountingEmbed()
    DedupIndex.open(out, embed=other, embed_name="other", ann="numpy")
    assert other.texts == 6


def test_changed_parameters_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    write_output(out, [LONG])
    DedupIndex.open(out).save(out)
    assert DedupIndex.open(out, threshold=0.8).source == "cache"  # bands are rebuilt anyway
    index = DedupIndex.open(out, num_perm=64)
    assert index.source == "rebuilt" and index.check(LONG) is not None


def test_open_refuses_a_foreign_file_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    write_output(out, [LONG, UNRELATED[0]])
    with out.open("ab") as fh:
        fh.write(b'{"schema_version": 1, "id": "torn", "instr')
    index = DedupIndex.open(out)
    assert len(index) == 2
    foreign = tmp_path / "f.jsonl"
    write_output(foreign, [LONG])
    with foreign.open("ab") as fh:
        fh.write(b'{"text": "hello"}\n')
    with pytest.raises(UsageError, match=r"line 2: .*; cannot build its dedup index"):
        DedupIndex.open(foreign)
    # the index reads records as every reader does (store.jsonl): an id and an
    # instruction alone are not a record
    foreign.write_text('{"id": "a", "instruction": "x"}\n')
    with pytest.raises(UsageError, match="line 1"):
        DedupIndex.open(foreign)
    assert DedupIndex.open(tmp_path / "none.jsonl").source == "empty"


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "d.jsonl"
    write_output(out, [LONG])
    index = DedupIndex.open(out)
    index.save(out)
    before = cache_path(out).read_bytes()
    index.add("x", UNRELATED[0])

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        index.save(out)
    assert cache_path(out).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.dedup.npz"]


# -- dedup_file --------------------------------------------------------------


def test_dedup_file(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    texts = [LONG, UNRELATED[0], LONG.lower(), LONG_CHANGED, UNRELATED[1], UNRELATED[0] + "!!"]
    ids = write_output(src, texts)
    dst, rej = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    counts = dedup_file(src, dst, rejects=rej)
    assert counts == DedupCounts(total=6, kept=3, exact=2, near=1, semantic=0)
    assert counts.duplicates == 3
    src_lines = src.read_bytes().splitlines(keepends=True)
    assert dst.read_bytes().splitlines(keepends=True) == [src_lines[i] for i in (0, 1, 4)]
    rejected = [json.loads(line) for line in rej.read_text().splitlines()]
    assert [r["id"] for r in rejected] == [ids[2], ids[3], ids[5]]
    assert [r["duplicate_of"] for r in rejected] == [ids[0], ids[0], ids[1]]
    assert [r["duplicate_kind"] for r in rejected] == ["exact", "near", "exact"]
    assert all(r["reject_reason"] == "duplicate" for r in rejected)
    assert rejected[1]["similarity"] >= 0.7 and rejected[0]["similarity"] == 1.0
    original = json.loads(src_lines[3])
    assert {k: v for k, v in rejected[1].items() if k in original} == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "rejects.jsonl"]
    assert (dst.stat().st_mode & 0o777) == 0o644


def test_dedup_file_refuses_to_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_output(src, [LONG, LONG])
    dst = tmp_path / "out.jsonl"
    dst.write_text("keep me\n")
    with pytest.raises(UsageError, match="--overwrite"):
        dedup_file(src, dst)
    assert dst.read_text() == "keep me\n"
    assert dedup_file(src, dst, overwrite=True).kept == 1
    assert len(dst.read_text().splitlines()) == 1
    # In place, only with overwrite.
    with pytest.raises(UsageError, match="input"):
        dedup_file(src, src)
    assert dedup_file(src, src, overwrite=True) == DedupCounts(total=2, kept=1, exact=1)
    assert len(src.read_text().splitlines()) == 1
    with pytest.raises(UsageError, match="does not exist"):
        dedup_file(tmp_path / "missing.jsonl", tmp_path / "o2.jsonl")


def test_dedup_file_bad_line_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_output(src, [LONG, UNRELATED[0]])
    with src.open("a") as fh:
        fh.write('{"not": "a record"}\n')
    dst, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    with pytest.raises(UsageError, match="line 3"):
        dedup_file(src, dst, rejects=rej)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_dedup_file_against_an_existing_index(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old_ids = write_output(old, [LONG])
    new = tmp_path / "new.jsonl"
    write_output(new, [LONG_CHANGED, UNRELATED[0]], start=10)
    index = DedupIndex.open(old)
    rej = tmp_path / "rej.jsonl"
    counts = dedup_file(new, tmp_path / "out.jsonl", rejects=rej, index=index)
    assert (counts.kept, counts.near) == (1, 1)
    assert json.loads(rej.read_text())["duplicate_of"] == old_ids[0]
    assert len(index) == 2


def test_dedup_file_stdin_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.jsonl"
    write_output(src, [LONG, LONG + " ", UNRELATED[0]])
    stdout = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes())))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout))
    counts = dedup_file("-", "-")
    assert (counts.total, counts.kept, counts.exact) == (3, 2, 1)
    lines = stdout.getvalue().splitlines()
    assert [json.loads(x)["instruction"] for x in lines] == [LONG, UNRELATED[0]]


def test_dedup_file_large_batch(tmp_path: Path) -> None:
    """More records than one hashing batch: decisions cross batch borders."""
    n = BATCH + 50
    rng = random.Random(5)
    words = ["".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(4000)]
    texts = [" ".join(rng.choices(words, k=12)) + "?" for _ in range(n)]
    texts[-1] = texts[3].upper()
    src = tmp_path / "in.jsonl"
    ids = write_output(src, texts)
    rej = tmp_path / "rej.jsonl"
    counts = dedup_file(src, tmp_path / "out.jsonl", rejects=rej)
    assert counts.exact == 1 and counts.total == n
    assert json.loads(rej.read_text())["duplicate_of"] == ids[3]


@pytest.mark.slow
@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=25))
def test_any_text_batch_equals_one_by_one(texts: list[str]) -> None:
    items = [(str(i), t) for i, t in enumerate(texts)]
    one = DedupIndex()
    expected = [one.check_and_add(i, t) for i, t in items]
    assert DedupIndex().check_and_add_many(items) == expected
    kept = [normalize(t) for t, d in zip(texts, expected, strict=True) if d is None]
    assert len(kept) == len(set(kept)) == len(one)
    for t, d in zip(texts, expected, strict=True):
        if d is not None and d.kind == "exact":
            assert normalize(texts[int(d.of_id)]) == normalize(t)
