"""``magpie merge``'s flow: :func:`merge_files` streams the inputs, through one
dedup index, into the output (see :mod:`magpie.commands.merge`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from magpie.commands.dedup import duplicate_reject_line, write_verdict
from magpie.commands.merge.inputs import (
    Seen,
    check_inputs,
    check_mixed_manifests,
    input_manifest,
    merge_targets,
)
from magpie.commands.merge.report import InputReport, MergeReport, merged_manifest
from magpie.errors import OutputClosed, UsageError
from magpie.pipeline.stages.dedup.index import (
    DEFAULT_SEMANTIC_THRESHOLD,
    DEFAULT_THRESHOLD,
    DedupIndex,
    Duplicate,
    EmbedFn,
)
from magpie.store.atomic import AtomicOutput
from magpie.store.jsonl import RecordReader
from magpie.store.manifest import manifest_path, write_manifest
from magpie.store.targets import STDIO

_BATCH = 1024  # records handed to the dedup index at once


def merge_files(
    inputs: Sequence[Path | str],
    output: Path | str,
    *,
    rejects: Path | str | None = None,
    dedup: bool = True,
    threshold: float = DEFAULT_THRESHOLD,
    overwrite: bool = False,
    allow_mixed: bool = False,
    embed: EmbedFn | None = None,
    embed_name: str | None = None,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
) -> MergeReport:
    """Merge magpie JSONL ``inputs`` into ``output`` (``-``: stdout); see the module doc.

    ``embed`` (with ``dedup``) turns on semantic dedup at ``semantic_threshold``;
    ``embed_name`` names its model (in the manifest and the saved index).

    Raises :class:`UsageError` (exit 2) for bad paths, an existing output without
    ``overwrite``, an input that is the output, a line that is not a record, or
    inputs of another model or template without ``allow_mixed``;
    :class:`~magpie.store.lock.OutputLocked` (exit 4) when another run holds the
    output's or an input's lock; :class:`~magpie.errors.OutputClosed` when the
    reader of stdout went away.
    """
    paths = check_inputs(inputs)
    out_name = str(output)
    if rejects is not None and str(rejects) == STDIO and out_name == STDIO:
        raise UsageError("output and rejects cannot both be stdout (-): give --rejects a file")
    if embed is not None and not dedup:
        raise UsageError("semantic dedup needs dedup on: drop --no-dedup")
    index = (
        DedupIndex(
            threshold=threshold,
            embed=embed,
            embed_name=embed_name,
            semantic_threshold=semantic_threshold,
        )
        if dedup
        else None
    )  # validates the thresholds
    report = MergeReport(
        output=out_name,
        dedup=dedup,
        threshold=threshold,
        semantic_model=(embed_name or "custom") if embed is not None else None,
        semantic_threshold=semantic_threshold,
    )
    out_path = None if out_name == STDIO else Path(out_name).expanduser()
    # Checked once the locks are held: an output a run is writing is exit 4.
    with merge_targets(paths, output, rejects, overwrite).claim() as targets:
        out = AtomicOutput(targets["output"])
        named_rejects = targets.get("--rejects")
        rej = AtomicOutput(named_rejects) if named_rejects is not None else None
        manifests = [input_manifest(p) for p in paths]
        if not allow_mixed:
            check_mixed_manifests(paths, manifests)
        seen = Seen(allow_mixed)
        try:
            out.open()
            if rej is not None:
                rej.open()
            for p, man in zip(paths, manifests, strict=True):
                info = InputReport(path=str(p), manifest=man[0], note=man[1])
                report.inputs.append(info)
                _merge_one(p, info, index, seen, out, rej)
            out.commit()
            if rej is not None:
                rej.commit()
        except BrokenPipeError:
            raise OutputClosed("stdout was closed by its reader") from None
        finally:
            out.abort()
            if rej is not None:
                rej.abort()
        if out_path is not None:
            if index is not None:
                index.save(out_path)  # a later top-up of this file starts from this index
            manifest = merged_manifest(out_path, report, index, seen, allow_mixed)
            write_manifest(out_path, manifest)
            report.manifest_path = manifest_path(out_path)
    report.notes.extend(i.note for i in report.inputs if i.note)
    return report


def _merge_one(
    path: Path,
    info: InputReport,
    index: DedupIndex | None,
    seen: Seen,
    out: AtomicOutput,
    rej: AtomicOutput | None,
) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for batch in _batches(_hashed(fh, digest), path, info, seen):
            fresh = [(rid, text) for _, rid, text in batch if text is not None]
            dups: Iterable[Duplicate | None] = (
                index.check_and_add_many(fresh) if index is not None else [None] * len(fresh)
            )
            verdicts = iter(dups)
            for raw, rid, text in batch:
                if text is None:  # the same record again
                    info.id_collisions += 1
                    if rej is not None:
                        rej.write(duplicate_reject_line(raw, Duplicate("id", rid, 1.0)))  # type: ignore[arg-type]
                    continue
                write_verdict(raw, next(verdicts), info, out, rej)
        st = os.fstat(fh.fileno())
    info.size, info.mtime_ns, info.sha256 = st.st_size, st.st_mtime_ns, digest.hexdigest()
    man = info.manifest
    if man is not None and man.records != info.records and info.note is None:
        info.note = (
            f"{path} holds {info.records} records, its manifest says {man.records}: "
            "it was changed after its last run"
        )


def _hashed(lines: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    """``lines`` as they are, each added to ``digest`` (blank lines too)."""
    for raw in lines:
        digest.update(raw)
        yield raw


def _batches(
    lines: Iterable[bytes], path: Path, info: InputReport, seen: Seen
) -> Iterable[list[tuple[bytes, str, str | None]]]:
    """Batches of ``(line, id, instruction)``; instruction None: the id was read before."""
    batch: list[tuple[bytes, str, str | None]] = []
    for line in RecordReader(lines, str(path), then="nothing written"):
        rec = line.record
        seen.note(rec, path, line.lineno)
        info.records += 1
        if rec.id in seen.ids:
            batch.append((line.raw, rec.id, None))
        else:
            seen.ids.add(rec.id)
            batch.append((line.raw, rec.id, rec.instruction))
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
