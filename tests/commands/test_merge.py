"""`magpie merge`: shards of real runs into one file, global dedup, the merged
manifest, the refusals, and the command end to end in a subprocess."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
from batch_helpers import MODEL, gen_args, read_records, scripted_server
from hypothesis import given, settings
from hypothesis import strategies as st
from magpie_cli import run_magpie
from ollama_server import OllamaTestServer, ScriptedEngine, build_models
from samples import LONG, LONG_CHANGED, SAME_TEMPLATE, UNRELATED, make_record

from magpie.commands.merge import merge_files
from magpie.errors import ExitStatus, UsageError
from magpie.records import Record
from magpie.store.jsonl import JsonlWriter
from magpie.store.lock import OutputLock, OutputLocked
from magpie.store.manifest import Manifest, manifest_path, read_manifest, write_manifest


def write_records(path: Path, records: list[Record]) -> list[str]:
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
    return [r.id for r in records]


def recs(start: int, texts: list[str], seed: int = 1) -> list[Record]:
    return [make_record(start + i, seed=seed, instruction=t) for i, t in enumerate(texts)]


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def made_by_merge(tmp_path: Path) -> list[str]:
    """What merging left in ``tmp_path`` besides the inputs (lock files aside)."""
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))


# -- shards of real runs --------------------------------------------------------


def test_shards_of_real_runs_merge_into_the_union(tmp_path: Path) -> None:
    names = [f"s{i}.jsonl" for i in range(3)]
    with scripted_server() as srv:
        for i, name in enumerate(names):
            proc = run_magpie(*gen_args(srv, name, 6, "--seed", "42", "--shard", f"{i}/3"))
            assert proc.returncode == 0, proc.stderr
        shards = [tmp_path / n for n in names]
        concat = b"".join(p.read_bytes() for p in shards)

        # Without dedup: exactly the concatenation (the shards share no id).
        plain = run_magpie("merge", *names, "-o", "plain.jsonl", "--no-dedup")
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout == ""
        assert (tmp_path / "plain.jsonl").read_bytes() == concat

        # With dedup: what `magpie dedup` makes of the concatenated files.
        (tmp_path / "concat.jsonl").write_bytes(concat)
        ref = run_magpie("dedup", "concat.jsonl", "-o", "ref.jsonl")
        assert ref.returncode == 0, ref.stderr
        proc = run_magpie("merge", *names, "-o", "all.jsonl", "--rejects", "rej.jsonl")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""
        out = tmp_path / "all.jsonl"
        assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
        kept = read_records(out)
        assert len({r.id for r in kept}) == len(kept)
        dropped = json_lines(tmp_path / "rej.jsonl")
        assert len(kept) + len(dropped) == 18
        assert {d["duplicate_of"] for d in dropped} <= {r.id for r in kept}
        summary = proc.stderr.strip().splitlines()[-1]
        assert summary.startswith(f"magpie: merged {len(kept)} kept of 18 records in 3 files")
        assert "all.jsonl.manifest.json" in summary
        assert (tmp_path / "all.jsonl.dedup.npz").exists()

        # The merged manifest: a Manifest (stats and top-ups read it) with a merge section.
        m = read_manifest(out)
        assert m is not None
        shard_manifests = [read_manifest(p) for p in shards]
        first = shard_manifests[0]
        assert first is not None
        assert m.model_extra["kind"] == "merge"
        assert (m.model, m.backend, m.seed, m.records) == (MODEL, "ollama", 42, len(kept))
        assert m.model_digest == first.model_digest and m.template == first.template
        assert m.settings["shard"] is None
        assert m.settings["instruction"] == first.settings["instruction"]
        assert [r.model_extra["input"] for r in m.runs] == names
        merge = m.model_extra["merge"]
        assert merge["settings"] == {
            "dedup": True,
            "threshold": 0.7,
            "semantic_model": None,
            "semantic_threshold": None,
            "num_perm": 128,
            "shingle_size": 5,
            "allow_mixed": False,
        }
        assert merge["counts"]["read"] == 18 and merge["counts"]["kept"] == len(kept)
        assert merge["counts"]["duplicates"] == len(dropped)
        assert merge["notes"] == []
        for i, (entry, shard) in enumerate(zip(merge["inputs"], shards, strict=True)):
            data = shard.read_bytes()
            assert entry["path"] == names[i]
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["size"] == len(data) and entry["records"] == 6
            assert entry["manifest"]["shard"] == f"{i}/3"
            assert entry["manifest"]["seed"] == 42 and entry["manifest"]["model"] == MODEL
            assert entry["note"] is None
        assert sum(e["kept"] for e in merge["inputs"]) == len(kept)

        # `-o -`: the same records on stdout, the summary on stderr, no manifest.
        piped = run_magpie("merge", *names, "-o", "-")
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == out.read_text()
        assert "manifest" not in piped.stderr
        assert not (tmp_path / "-.manifest.json").exists()
        quiet = run_magpie("merge", *names, "-o", "q.jsonl", "--quiet")
        assert (quiet.returncode, quiet.stderr) == (0, "")

        # A later top-up of the merged file continues it without a shard.
        top = run_magpie(*gen_args(srv, "all.jsonl", len(kept) + 2, "--seed", "42"))
        assert top.returncode == 0, top.stderr
    after = read_records(out)
    assert len(after) == len(kept) + 2 and len({r.id for r in after}) == len(after)


def test_stats_reads_the_merged_manifest(tmp_path: Path) -> None:
    from magpie.commands.stats import compute_stats

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, recs(0, [LONG, UNRELATED[0]]))
    write_records(b, recs(10, [LONG.upper(), UNRELATED[1]]))
    merge_files([a, b], tmp_path / "all.jsonl")
    data = compute_stats(tmp_path / "all.jsonl")
    assert data.records == 3
    assert data.manifest is not None and data.manifest.model == "m"


# -- planted duplicates, overlapping copies -----------------------------------------


def test_planted_duplicates_across_files(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    a_ids = write_records(a, recs(0, [LONG, UNRELATED[0], SAME_TEMPLATE[0]]))
    b_ids = write_records(b, recs(10, [LONG.lower() + " ", UNRELATED[1], LONG_CHANGED]))
    c_ids = write_records(c, recs(20, [SAME_TEMPLATE[1], UNRELATED[0] + "!!", UNRELATED[2]]))
    out, rej = tmp_path / "all.jsonl", tmp_path / "rej.jsonl"
    report = merge_files([a, b, c], out, rejects=rej)
    assert [r.id for r in read_records(out)] == [
        a_ids[0],
        a_ids[1],
        a_ids[2],
        b_ids[1],
        c_ids[0],
        c_ids[2],
    ]
    assert report.counts() == {
        "read": 9,
        "kept": 6,
        "duplicates": 3,
        "exact": 2,
        "near": 1,
        "semantic": 0,
        "id_collisions": 0,
    }
    assert [(i.kept, i.exact, i.near) for i in report.inputs] == [(3, 0, 0), (1, 1, 1), (2, 1, 0)]
    dropped = json_lines(rej)
    assert [(d["id"], d["duplicate_of"], d["duplicate_kind"]) for d in dropped] == [
        (b_ids[0], a_ids[0], "exact"),
        (b_ids[2], a_ids[0], "near"),
        (c_ids[1], a_ids[1], "exact"),
    ]
    assert all(d["reject_reason"] == "duplicate" for d in dropped)
    assert dropped[0]["similarity"] == 1.0 and 0.7 <= dropped[1]["similarity"] < 1.0
    # Kept lines are copied byte for byte.
    assert out.read_bytes().splitlines()[3] == b.read_bytes().splitlines()[1]
    # No manifests next to the inputs: noted, and the records fill in what they share.
    assert len(report.notes) == 3 and all("has no manifest" in n for n in report.notes)
    m = read_manifest(out)
    assert m is not None
    assert (m.model, m.backend, m.seed, m.model_digest) == ("m", "embedded", 1, None)
    assert m.template == {"name": "chatml", "source": "registry"}
    assert m.runs == [] and m.settings == {"shard": None}
    assert [e["manifest"] for e in m.model_extra["merge"]["inputs"]] == [None, None, None]


def test_threshold_and_no_dedup(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, recs(0, [LONG]))
    write_records(b, recs(10, [LONG_CHANGED, LONG]))
    assert merge_files([a, b], tmp_path / "o1.jsonl").counts()["kept"] == 1
    strict = merge_files([a, b], tmp_path / "o2.jsonl", threshold=0.99)
    assert (strict.kept, strict.exact, strict.near) == (2, 1, 0)
    loose = merge_files([a, b], tmp_path / "o3.jsonl", dedup=False)
    assert (loose.kept, loose.duplicates) == (3, 0)
    m = read_manifest(tmp_path / "o3.jsonl")
    assert m is not None and m.model_extra["merge"]["settings"]["dedup"] is False
    assert not (tmp_path / "o3.jsonl.dedup.npz").exists()
    with pytest.raises(UsageError, match="threshold"):
        merge_files([a], tmp_path / "o4.jsonl", threshold=1.5)


def test_overlapping_copies_count_once(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a_ids = write_records(a, recs(0, [LONG, UNRELATED[0], UNRELATED[1]]))
    b_ids = write_records(b, recs(10, [UNRELATED[2]]))
    copy = tmp_path / "a-copy.jsonl"
    copy.write_bytes(a.read_bytes() + b.read_bytes())  # a copy of a, then b's record again
    for dedup in (True, False):
        out, rej = tmp_path / f"all-{dedup}.jsonl", tmp_path / f"rej-{dedup}.jsonl"
        report = merge_files([a, b, copy], out, rejects=rej, dedup=dedup)
        assert [r.id for r in read_records(out)] == a_ids + b_ids
        assert (report.read, report.kept, report.id_collisions) == (8, 4, 4)
        assert report.inputs[2].id_collisions == 4 and report.inputs[2].kept == 0
        dropped = json_lines(rej)
        assert [(d["id"], d["duplicate_of"], d["duplicate_kind"]) for d in dropped] == [
            (i, i, "id") for i in a_ids + b_ids
        ]
        m = read_manifest(out)
        assert m is not None and m.model_extra["merge"]["counts"]["id_collisions"] == 4


# -- the manifest: inputs' manifests, mixed models ---------------------------------


def fake_manifest(path: Path, *, model: str = "m", digest: str = "sha256:aaa", **kw) -> Manifest:
    man = Manifest(
        output=path.name,
        magpie_version="0.1.0",
        backend="embedded",
        model=model,
        model_digest=digest,
        template={"name": "chatml", "source": "registry", "text": "<|im_start|>user\n"},
        settings={"concurrency": 1, "shard": None, "timeout": 300.0, **kw},
        seed=1,
        records=len(path.read_text().splitlines()),
    )
    write_manifest(path, man)
    return man


def test_manifests_of_the_inputs(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    write_records(a, recs(0, [LONG]))
    write_records(b, recs(10, [UNRELATED[0]]))
    write_records(c, recs(20, [UNRELATED[1]], seed=2))
    fake_manifest(a, timeout=60.0)
    fake_manifest(b, timeout=300.0)
    manifest_path(c).write_text("{not json")
    report = merge_files([a, b, c], tmp_path / "all.jsonl")
    assert report.notes == [f"{c}: its manifest c.jsonl.manifest.json is unreadable; ignored"]
    m = read_manifest(tmp_path / "all.jsonl")
    assert m is not None
    assert m.model_digest == "sha256:aaa" and m.template is not None
    assert m.template["text"] == "<|im_start|>user\n"
    assert m.seed is None  # the inputs' records have run seeds 1 and 2
    assert m.settings == {"concurrency": 1, "shard": None}  # the timeouts differ
    # A changed input is noted.
    write_records(b, recs(30, [UNRELATED[2]]))
    again = merge_files([a, b], tmp_path / "all.jsonl", overwrite=True)
    assert any("manifest says 1" in n for n in again.notes)


def test_mixed_inputs_are_refused_unless_allowed(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, recs(0, [LONG]))
    write_records(b, recs(10, [UNRELATED[0]]))
    fake_manifest(a)
    fake_manifest(b, digest="sha256:bbb")
    out = tmp_path / "all.jsonl"
    with pytest.raises(UsageError, match=r"b\.jsonl was made with model digest .*--allow-mixed"):
        merge_files([a, b], out)
    assert not out.exists() and not manifest_path(out).exists()
    merge_files([a, b], out, allow_mixed=True)
    m = read_manifest(out)
    assert m is not None and m.model_digest is None and m.model == "m"

    # Without manifests, the records themselves say the model.
    other = [r.model_copy(update={"model": "other"}) for r in recs(40, [UNRELATED[1]])]
    c = tmp_path / "c.jsonl"
    write_records(c, other)
    with pytest.raises(UsageError, match=r"c\.jsonl line 1 holds a record of model 'other'"):
        merge_files([a, c], tmp_path / "ac.jsonl")
    merge_files([a, c], tmp_path / "ac.jsonl", allow_mixed=True)
    m = read_manifest(tmp_path / "ac.jsonl")
    assert m is not None and (m.model, m.model_digest) == (None, None)
    assert m.model_extra["merge"]["settings"]["allow_mixed"] is True


def test_mixed_models_of_real_runs_end_to_end(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    with OllamaTestServer(build_models(["llama3.1", "qwen2.5"], engine)) as srv:
        for name, model in (("a.jsonl", MODEL), ("b.jsonl", "qwen2.5:0.5b")):
            proc = run_magpie(
                "generate", "-n", "3", "--model", model, "--host", srv.url, "-o", name
            )
            assert proc.returncode == 0, proc.stderr
    proc = run_magpie("merge", "a.jsonl", "b.jsonl", "-o", "all.jsonl")
    assert proc.returncode == ExitStatus.USAGE
    assert proc.stderr.startswith("magpie: error: b.jsonl was made with model 'qwen2.5:0.5b'")
    assert len(proc.stderr.splitlines()) == 1 and "--allow-mixed" in proc.stderr
    assert not (tmp_path / "all.jsonl").exists()
    ok = run_magpie("merge", "a.jsonl", "b.jsonl", "-o", "all.jsonl", "--allow-mixed")
    assert ok.returncode == 0, ok.stderr
    assert {r.model for r in read_records(tmp_path / "all.jsonl")} == {MODEL, "qwen2.5:0.5b"}
    m = read_manifest(tmp_path / "all.jsonl")
    assert m is not None and (m.model, m.template, m.model_digest) == (None, None, None)
    assert m.backend == "ollama"
    stats = run_magpie("stats", "all.jsonl", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["manifest"]["model"] is None


# -- refusals -------------------------------------------------------------------


def test_bad_line_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", recs(0, [LONG, UNRELATED[0]]))
    b = tmp_path / "b.jsonl"
    write_records(b, recs(10, [UNRELATED[1]]))
    with b.open("a") as fh:
        fh.write('{"id": "x", "instruction": "not a record"}\n')
    proc = run_magpie("merge", "a.jsonl", "b.jsonl", "-o", "all.jsonl", "--rejects", "rej.jsonl")
    assert proc.returncode == ExitStatus.USAGE
    assert proc.stdout == ""
    assert proc.stderr.startswith("magpie: error: b.jsonl is not a magpie JSONL (line 2: ")
    assert len(proc.stderr.splitlines()) == 1
    assert made_by_merge(tmp_path) == ["a.jsonl", "b.jsonl"]
    # A torn last line says so.
    b.write_bytes(b.read_bytes().splitlines(keepends=True)[0] + b'{"id": "y", "ins')
    with pytest.raises(UsageError, match="line 2, an incomplete last line"):
        merge_files([tmp_path / "a.jsonl", b], tmp_path / "all.jsonl")
    assert made_by_merge(tmp_path) == ["a.jsonl", "b.jsonl"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", recs(0, [LONG]))
    (tmp_path / "all.jsonl").write_text("keep me\n")
    proc = run_magpie("merge", "a.jsonl", "-o", "all.jsonl")
    assert proc.returncode == ExitStatus.USAGE and "--overwrite" in proc.stderr
    assert (tmp_path / "all.jsonl").read_text() == "keep me\n"
    assert not manifest_path(tmp_path / "all.jsonl").exists()
    (tmp_path / "rej.jsonl").write_text("keep me too\n")
    proc = run_magpie("merge", "a.jsonl", "-o", "new.jsonl", "--rejects", "rej.jsonl")
    assert proc.returncode == ExitStatus.USAGE and "rejects" in proc.stderr
    assert not (tmp_path / "new.jsonl").exists()
    proc = run_magpie("merge", "a.jsonl", "-o", "all.jsonl", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "all.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_output_or_rejects_that_is_an_input_is_refused(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", recs(0, [LONG]))
    write_records(tmp_path / "b.jsonl", recs(10, [UNRELATED[0]]))
    before = (tmp_path / "b.jsonl").read_bytes()
    for args in (
        ["a.jsonl", "b.jsonl", "-o", "./b.jsonl", "--overwrite"],
        ["a.jsonl", "b.jsonl", "-o", "all.jsonl", "--rejects", "a.jsonl", "--overwrite"],
        ["a.jsonl", "a.jsonl", "-o", "all.jsonl"],
        ["a.jsonl", "missing.jsonl", "-o", "all.jsonl"],
        ["a.jsonl", "-", "-o", "all.jsonl"],
        ["a.jsonl", "-o", "all.jsonl", "--rejects", "all.jsonl"],
        ["a.jsonl", "-o", "-", "--rejects", "-"],
        ["a.jsonl", "-o", "nodir/all.jsonl"],
    ):
        proc = run_magpie("merge", *args)
        assert proc.returncode == ExitStatus.USAGE, (args, proc.stderr)
        assert proc.stderr.startswith("magpie: error: ") and len(proc.stderr.splitlines()) == 1
    assert "is the input" in run_magpie("merge", "a.jsonl", "-o", "a.jsonl").stderr
    assert (tmp_path / "b.jsonl").read_bytes() == before
    assert made_by_merge(tmp_path) == ["a.jsonl", "b.jsonl"]


def test_locks_of_output_and_inputs(tmp_path: Path) -> None:
    a, out = tmp_path / "a.jsonl", tmp_path / "all.jsonl"
    write_records(a, recs(0, [LONG]))
    with OutputLock(out):
        proc = run_magpie("merge", "a.jsonl", "-o", "all.jsonl")
        assert proc.returncode == ExitStatus.LOCKED, proc.stderr
        assert "another magpie run is writing" in proc.stderr
    assert not out.exists()
    # A `magpie generate` still writing a shard holds its lock.
    with OutputLock(a), pytest.raises(OutputLocked, match="input .*a.jsonl"):
        merge_files([a], out)
    assert not out.exists()
    merge_files([a], out)  # the locks were released
    assert out.exists()


# -- merging in steps -------------------------------------------------------------

POOL_TEXTS = [
    LONG,
    LONG.lower(),
    LONG_CHANGED,
    *UNRELATED,
    UNRELATED[0] + "!!",
    *SAME_TEMPLATE,
]
POOL = recs(0, POOL_TEXTS) + recs(100, POOL_TEXTS[:4], seed=2)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, len(POOL) - 1)), max_size=16),
    st.booleans(),
)
def test_merging_in_steps_equals_merging_at_once(picks: list[tuple[int, int]], dedup: bool) -> None:
    """merge(merge(A, B), C) == merge(A, B, C), overlapping copies included."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = [d / f"{n}.jsonl" for n in "abc"]
        for f in files:
            f.touch()
        for which, rec in picks:
            write_records(files[which], [POOL[rec]])
        once = merge_files(files, d / "once.jsonl", dedup=dedup)
        ab = merge_files(files[:2], d / "ab.jsonl", dedup=dedup)
        steps = merge_files([d / "ab.jsonl", files[2]], d / "steps.jsonl", dedup=dedup)
        assert (d / "steps.jsonl").read_bytes() == (d / "once.jsonl").read_bytes()
        assert steps.kept == once.kept
        assert ab.duplicates + steps.duplicates == once.duplicates
        m = read_manifest(d / "steps.jsonl")
        assert m is not None and m.records == once.kept
