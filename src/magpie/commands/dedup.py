"""``magpie dedup``: the records of a file that are not duplicates, and the
line-level helpers ``magpie merge`` shares (:func:`write_verdict`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any, Protocol

from magpie.errors import UsageError
from magpie.pipeline.stages.dedup.index import (
    DEFAULT_THRESHOLD,
    DedupCounts,
    DedupIndex,
    Duplicate,
)
from magpie.pipeline.stages.dedup.minhash import BATCH
from magpie.store.atomic import AtomicOutput
from magpie.store.dataset import Dataset
from magpie.store.jsonl import RecordReader
from magpie.store.targets import STDIO, Targets, same_file


def dedup_targets(
    src: Path | str, dst: Path | str, rejects: Path | str | None, *, overwrite: bool
) -> Targets:
    """What ``magpie dedup`` reads and writes: the input, the output (in place
    only with ``overwrite``) with its dedup index beside it, ``rejects``;
    checked (exit 2)."""
    src_name = str(src)
    if src_name != STDIO and not Path(src_name).expanduser().is_file():
        raise UsageError(f"input {src_name} does not exist or is not a file")
    if not overwrite and same_file(dst, src_name):
        raise UsageError(f"output {dst} is the input: pass --overwrite to dedup it in place")
    targets = Targets(overwrite=overwrite)
    inp = targets.read("input", src_name)
    index = (
        {"dedup index": Dataset(Path(dst).expanduser()).dedup_index} if str(dst) != STDIO else None
    )
    targets.replace("output", dst, sidecars=index, may_be=inp if overwrite else None)
    targets.replace("--rejects", rejects)
    return targets.check()


def dedup_file(
    src: Path | str,
    dst: Path | str,
    *,
    rejects: Path | str | None = None,
    index: DedupIndex | None = None,
    overwrite: bool = False,
) -> DedupCounts:
    """Copy the records of ``src`` that are not duplicates to ``dst``.

    Streams ``src`` (``-``: stdin); keeps each record's line byte for byte;
    writes ``dst`` (``-``: stdout) and ``rejects`` through temporary files
    renamed at the end, so a failed run leaves neither behind.  A rejected
    record goes to ``rejects`` with ``reject_reason``, ``duplicate_of``,
    ``duplicate_kind`` and ``similarity`` added.  ``index`` may already hold
    records (of another file): those count as earlier records; kept records are
    added to it.  An existing ``dst`` or ``rejects`` is replaced only with
    ``overwrite``; both are locked while written (exit 4 when another run
    holds one).
    """
    with dedup_targets(src, dst, rejects, overwrite=overwrite).claim() as targets:
        return _dedup(str(src), targets, index if index is not None else DedupIndex())


def _dedup(src_name: str, targets: Targets, index: DedupIndex) -> DedupCounts:
    """The dedup of a claimed input, output and rejects."""
    out = AtomicOutput(targets["output"])
    named = targets.get("--rejects")
    rej = AtomicOutput(named) if named is not None else None
    counts = DedupCounts()
    try:
        out.open()
        if rej is not None:
            rej.open()
        with contextlib.closing(_record_batches(src_name)) as batches:
            for batch in batches:
                dups = index.check_and_add_many((rid, text) for _, rid, text in batch)
                for (raw, _, _), dup in zip(batch, dups, strict=True):
                    counts.total += 1
                    write_verdict(raw, dup, counts, out, rej)
        out.commit()
        if rej is not None:
            rej.commit()
    finally:
        out.abort()
        if rej is not None:
            rej.abort()
    return counts


def _record_batches(src: str) -> Generator[list[tuple[bytes, str, str]], None, None]:
    """Batches of ``(line, id, instruction)`` of ``src`` (``-``: stdin)."""
    batch: list[tuple[bytes, str, str]] = []
    for line in RecordReader(src, then="nothing written"):
        batch.append((line.raw, line.record.id, line.record.instruction))
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class Tally(Protocol):
    """Counts of kept records and of duplicates by kind."""

    kept: int
    exact: int
    near: int
    semantic: int


def write_verdict(
    raw: bytes,
    dup: Duplicate | None,
    counts: Tally,
    out: AtomicOutput,
    rej: AtomicOutput | None,
) -> None:
    """A record line to ``out`` when kept (``dup`` None), else to ``rej`` with
    what it duplicates; counted in ``counts`` as kept or by the duplicate's kind."""
    if dup is None:
        counts.kept += 1
        out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        return
    setattr(counts, dup.kind, getattr(counts, dup.kind) + 1)
    if rej is not None:
        rej.write(duplicate_reject_line(raw, dup))


def duplicate_reject_line(raw: bytes, dup: Duplicate) -> bytes:
    """The rejects-file line of a dropped record: its JSON plus what it duplicates."""
    obj = json.loads(raw)
    obj["reject_reason"] = "duplicate"
    obj["duplicate_of"] = dup.of_id
    obj["duplicate_kind"] = dup.kind
    obj["similarity"] = round(dup.similarity, 6)
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def semantic_options(
    model: str | None,
    threshold: float | None,
    backend: str | None,
    host: str | None,
    *,
    dedup: bool,
) -> tuple[dict[str, Any], Any]:
    """The DedupIndex options of semantic dedup for ``dedup`` and ``merge``
    (flags over MAGPIE_SEMANTIC_*), and the embedder behind them (None: off).
    Bad settings fail here (exit 2); the server is reached at the first embedding."""
    from magpie.pipeline.stages.dedup.embeddings import make_embedder
    from magpie.settings import semantic_config

    cfg = semantic_config(
        {
            "semantic_model": model,
            "semantic_threshold": threshold,
            "semantic_backend": backend,
            "semantic_host": host,
            "dedup": dedup,
        }
    )
    if not cfg.semantic_model:
        return {}, None
    embedder = make_embedder(cfg.semantic_spec(), cfg.retry)
    opts = {
        "embed": embedder,
        "embed_name": cfg.semantic_model,
        "semantic_threshold": cfg.semantic_threshold,
    }
    return opts, embedder


def dedup_path(
    src: Path | str,
    dst: Path | str,
    *,
    rejects: Path | str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    semantic: tuple[str | None, float | None, str | None, str | None] = (None, None, None, None),
    overwrite: bool = False,
) -> DedupCounts:
    """``magpie dedup``: :func:`dedup_file` with a fresh index (semantic when
    ``semantic``'s model is set: model, threshold, backend, host over
    ``MAGPIE_SEMANTIC_*``), saved next to ``dst`` so that a later top-up of it
    starts from this index."""
    model, sem_threshold, backend, host = semantic
    targets = dedup_targets(src, dst, rejects, overwrite=overwrite)
    opts, embedder = semantic_options(model, sem_threshold, backend, host, dedup=True)
    try:
        index = DedupIndex(threshold=threshold, **opts)
        with targets.claim():  # held until the index beside the output is saved
            counts = _dedup(str(src), targets, index)
            counts.semantic_on = embedder is not None
            if str(dst) != STDIO:
                index.save(Path(dst).expanduser())
    finally:
        if embedder is not None:
            embedder.close()
    return counts
