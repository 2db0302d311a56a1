"""``magpie merge``: combine the outputs of several runs (shards) into one file.

:func:`merge_files` streams the inputs in the order given and writes one JSONL:

* every line must be a magpie record (else :class:`~magpie.errors.UsageError`,
  exit 2, naming the file and line; nothing is written);
* a record whose ``id`` was already read is the same record again (overlapping
  copies of a shard): it is skipped and counted as an id collision;
* the others go through one :class:`~magpie.pipeline.stages.dedup.index.DedupIndex` over all inputs,
  with the defaults of ``magpie dedup``: the first record of each group of
  exact or near-duplicate instructions is kept (and of semantic duplicates,
  with an ``embed`` function: ``magpie merge --semantic-model``);
* each kept line is copied byte for byte; with ``rejects``, each dropped line
  is written there with ``reject_reason`` ``"duplicate"``, ``duplicate_of``
  (the id it repeats), ``duplicate_kind`` (``exact``, ``near``, ``semantic`` or
  ``id``) and
  ``similarity``, as ``magpie dedup --rejects`` writes them.

The output (and rejects) are written to temporary files renamed into place at
the end, so a failed merge leaves nothing half-written; an existing output is
replaced only with ``overwrite``; an input can never be the output.  The merge
holds the output's lock (exit 4 when another run holds it)
and the inputs' locks, so a shard still being written by ``magpie generate`` is
refused rather than read half-way.  Memory holds the dedup index and the set of
ids read; records are streamed.

Inputs made with another model, model digest or template (by their manifests,
or by their records' ``model`` and ``template``) are refused unless
``allow_mixed``; the error names the input that differs.

The merged manifest, ``<output>.manifest.json``, is a
:class:`~magpie.store.manifest.Manifest` (so ``magpie stats`` and a later top-up read
it) with ``"kind": "merge"``:

* the generation fields (``backend``, ``host``, ``model``, ``model_digest``,
  ``model_file``, ``template``, ``seed``) hold the value the inputs share, null
  where they differ or none is known; ``settings`` holds the generation
  settings every input manifest agrees on (``shard`` is null unless they all
  name the same one);
* ``records`` is the number of records kept; ``runs`` are the inputs' runs, in
  input order, each with an ``input`` key naming the file it came from;
* ``merge`` holds ``created_at``, ``settings`` (dedup on or off, threshold,
  semantic model and threshold, MinHash parameters, allow_mixed), ``counts`` (read, kept, duplicates and each
  kind of them), ``inputs`` (per file: path, size, mtime_ns, sha256, records
  read, kept, dropped by kind, and a summary of its own manifest: model, digest,
  backend, host, template, shard, seed, records; or ``null`` and a note when it
  has none) and ``notes``.

With ``output="-"`` the records stream to stdout as they are kept: no output
lock, no manifest, no dedup index file, and an error part-way leaves what was
already printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from magpie import __version__
from magpie.commands.dedup import duplicate_reject_line, write_verdict
from magpie.errors import MagpieError, OutputClosed, UsageError
from magpie.pipeline.stages.dedup.index import (
    DEFAULT_SEMANTIC_THRESHOLD,
    DEFAULT_THRESHOLD,
    DedupIndex,
    Duplicate,
    EmbedFn,
)
from magpie.records import Record
from magpie.store.atomic import AtomicOutput
from magpie.store.jsonl import record_error_detail
from magpie.store.lock import OutputLock, OutputLocked
from magpie.store.manifest import Manifest, RunEntry, manifest_path, read_manifest, write_manifest
from magpie.store.targets import STDIO, refuse_same, same_file

_BATCH = 1024  # records handed to the dedup index at once


@dataclass
class InputReport:
    """What the merge read from one input and what became of its records."""

    path: str
    #: Valid record lines read.
    records: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0
    semantic: int = 0
    #: Records whose id was already read (from an earlier input or line).
    id_collisions: int = 0
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    #: The input's own ``<input>.manifest.json``, None when missing or unreadable.
    manifest: Manifest | None = None
    #: Why there is no manifest, or what is odd about it.
    note: str | None = None

    @property
    def duplicates(self) -> int:
        return self.exact + self.near + self.semantic + self.id_collisions


@dataclass
class MergeReport:
    """What :func:`merge_files` did."""

    output: str
    inputs: list[InputReport] = field(default_factory=list)
    dedup: bool = True
    threshold: float = DEFAULT_THRESHOLD
    #: The embedding model of semantic dedup (None: off).
    semantic_model: str | None = None
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD
    #: Where the merged manifest went (None for stdout).
    manifest_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(i, name) for i in self.inputs)

    @property
    def read(self) -> int:
        return self._sum("records")

    @property
    def kept(self) -> int:
        return self._sum("kept")

    @property
    def exact(self) -> int:
        return self._sum("exact")

    @property
    def near(self) -> int:
        return self._sum("near")

    @property
    def semantic(self) -> int:
        return self._sum("semantic")

    @property
    def id_collisions(self) -> int:
        return self._sum("id_collisions")

    @property
    def duplicates(self) -> int:
        return self.exact + self.near + self.semantic + self.id_collisions

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "kept": self.kept,
            "duplicates": self.duplicates,
            "exact": self.exact,
            "near": self.near,
            "semantic": self.semantic,
            "id_collisions": self.id_collisions,
        }

    def summary(self) -> str:
        files = f"{len(self.inputs)} file" + ("s" if len(self.inputs) != 1 else "")
        return (
            f"{self.kept} kept of {self.read} records in {files}, "
            f"{self.duplicates} duplicates dropped ({self.exact} exact, {self.near} near, "
            + (f"{self.semantic} semantic, " if self.semantic_model else "")
            + f"{self.id_collisions} same id)"
        )


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
    paths = _check_inputs(inputs)
    out_name = str(output)
    for p in paths:
        if same_file(output, p):
            raise UsageError(f"output {out_name} is the input {p}: pick another --output")
        if rejects is not None and same_file(rejects, p):
            raise UsageError(f"rejects {rejects} is the input {p}: pick another path")
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
    with contextlib.ExitStack() as locks:
        if out_path is not None:
            locks.enter_context(OutputLock(out_path, create=False))
        for p in paths:
            _lock_input(locks, p)
        # Checked once the locks are held: an output a run is writing is exit 4.
        out, rej = _targets(output, rejects, overwrite)
        manifests = [_input_manifest(p) for p in paths]
        if not allow_mixed:
            _check_mixed_manifests(paths, manifests)
        seen = _Seen(allow_mixed)
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
            manifest = _merged_manifest(out_path, report, index, seen, allow_mixed)
            write_manifest(out_path, manifest)
            report.manifest_path = manifest_path(out_path)
    report.notes.extend(i.note for i in report.inputs if i.note)
    return report


# -- inputs ------------------------------------------------------------------


def _check_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    if not inputs:
        raise UsageError("give at least one input file to merge")
    paths: list[Path] = []
    files: dict[tuple[int, int], Path] = {}
    for raw in inputs:
        if str(raw) == STDIO:
            raise UsageError(
                "merge reads files, not stdin (-): save the stream to a file, "
                "or use `magpie dedup -`"
            )
        p = Path(raw).expanduser()
        if not p.is_file():
            raise UsageError(f"input {raw} does not exist or is not a file")
        st = p.stat()
        twice = files.setdefault((st.st_dev, st.st_ino), p)
        if twice is not p:
            raise UsageError(f"input {raw} is given twice (the same file as {twice})")
        paths.append(p)
    return paths


def _targets(
    output: Path | str, rejects: Path | str | None, overwrite: bool
) -> tuple[AtomicOutput, AtomicOutput | None]:
    out = AtomicOutput(output, overwrite, "output")
    refuse_same([("--rejects", rejects), ("output", output)])
    rej = AtomicOutput(rejects, overwrite, "--rejects") if rejects is not None else None
    return out, rej


def _lock_input(locks: contextlib.ExitStack, path: Path) -> None:
    """Hold an input's lock, so that no ``magpie generate`` appends to it meanwhile.

    Where the file cannot be opened to lock it, it is read without a lock (and
    reading it then says why).
    """
    lock = OutputLock(path, "input", create=False)
    try:
        lock.acquire()
    except OutputLocked:
        raise OutputLocked(
            f"another magpie run is writing the input {path}: "
            "wait for it to finish before merging it"
        ) from None
    except MagpieError:
        return
    locks.callback(lock.release)


def _input_manifest(path: Path) -> tuple[Manifest | None, str | None]:
    mpath = manifest_path(path)
    if not mpath.exists():
        return None, f"{path} has no manifest ({mpath.name}): its run settings are unknown"
    man = read_manifest(path)
    if man is None:
        return None, f"{path}: its manifest {mpath.name} is unreadable; ignored"
    return man, None


def _check_mixed_manifests(
    paths: list[Path], manifests: list[tuple[Manifest | None, str | None]]
) -> None:
    """Refuse inputs whose manifests name another model, digest or template."""
    ref: tuple[Path, Manifest] | None = None
    for path, (man, _) in zip(paths, manifests, strict=True):
        if man is None:
            continue
        if ref is None:
            ref = (path, man)
            continue
        first_path, first = ref
        problems = []
        if man.model != first.model:
            problems.append(f"model {man.model!r} ({first_path}: {first.model!r})")
        if man.model_digest and first.model_digest and man.model_digest != first.model_digest:
            problems.append(
                f"model digest {man.model_digest[:19]} ({first_path}: {first.model_digest[:19]})"
            )
        name, first_name = _template_name(man), _template_name(first)
        if name != first_name:
            problems.append(f"template {name!r} ({first_path}: {first_name!r})")
        text, first_text = (man.template or {}).get("text"), (first.template or {}).get("text")
        if not problems and text is not None and first_text is not None and text != first_text:
            problems.append(
                f"a different pre-query text (system prompt or template) than {first_path}"
            )
        if problems:
            raise UsageError(
                f"{path} was made with {'; '.join(problems)}: pass --allow-mixed to merge "
                "them anyway"
            )


def _template_name(man: Manifest) -> str | None:
    return (man.template or {}).get("name")


class _Seen:
    """Ids read so far, and the model, template, backend and seed of the records."""

    def __init__(self, allow_mixed: bool) -> None:
        self.allow_mixed = allow_mixed
        self.ids: set[str] = set()
        self.first: tuple[str, str, str] | None = None  # (path, model, template)
        self.models: dict[str, None] = {}
        self.templates: dict[tuple[str, str], None] = {}
        self.backends: dict[str, None] = {}
        self.seeds: dict[int, None] = {}

    def note(self, rec: Record, path: Path, lineno: int) -> None:
        if self.first is None:
            self.first = (str(path), rec.model, rec.template)
        elif not self.allow_mixed and (rec.model, rec.template) != self.first[1:]:
            first_path, model, template = self.first
            raise UsageError(
                f"{path} line {lineno} holds a record of model {rec.model!r}, template "
                f"{rec.template!r} ({first_path}: model {model!r}, template {template!r}): "
                "pass --allow-mixed to merge them anyway"
            )
        self.models.setdefault(rec.model)
        self.templates.setdefault((rec.template, rec.template_source))
        self.backends.setdefault(rec.backend)
        self.seeds.setdefault(rec.seed)


def _merge_one(
    path: Path,
    info: InputReport,
    index: DedupIndex | None,
    seen: _Seen,
    out: AtomicOutput,
    rej: AtomicOutput | None,
) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for batch in _batches(fh, path, digest, info, seen):
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


def _batches(
    fh: IO[bytes], path: Path, digest: Any, info: InputReport, seen: _Seen
) -> Iterable[list[tuple[bytes, str, str | None]]]:
    """Batches of ``(line, id, instruction)``; instruction None: the id was read before."""
    batch: list[tuple[bytes, str, str | None]] = []
    for lineno, raw in enumerate(fh, start=1):
        digest.update(raw)
        if not raw.strip():
            continue
        try:
            rec = Record.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            torn = "" if raw.endswith(b"\n") else ", an incomplete last line"
            raise UsageError(
                f"{path} is not a magpie JSONL (line {lineno}{torn}: {record_error_detail(exc)}); "
                "nothing written"
            ) from None
        seen.note(rec, path, lineno)
        info.records += 1
        if rec.id in seen.ids:
            batch.append((raw, rec.id, None))
        else:
            seen.ids.add(rec.id)
            batch.append((raw, rec.id, rec.instruction))
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# -- the merged manifest -----------------------------------------------------

#: Top-level manifest fields that hold the inputs' common value.
_COMMON = ("backend", "host", "model", "model_digest", "model_file", "template")
_MISSING = object()


def _common(values: list[Any]) -> Any:
    """The value all ``values`` share, else ``_MISSING`` (also for none at all)."""
    if not values:
        return _MISSING
    first = values[0]
    return first if all(v == first for v in values[1:]) else _MISSING


def _merged_manifest(
    output: Path,
    report: MergeReport,
    index: DedupIndex | None,
    seen: _Seen,
    allow_mixed: bool,
) -> Manifest:
    mans = [i.manifest for i in report.inputs if i.manifest is not None]
    fields: dict[str, Any] = {}
    for name in _COMMON:
        value = _common([getattr(m, name) for m in mans])
        fields[name] = None if value is _MISSING else value
    # The records are the source of truth for what they all share (inputs
    # without a manifest have records too).
    for name, values in (("model", seen.models), ("backend", seen.backends)):
        if len(values) > 1:
            fields[name] = None
            fields["model_digest" if name == "model" else "host"] = None
        elif values:
            fields[name] = next(iter(values))
    templates = list(seen.templates)
    if len({t[0] for t in templates}) > 1:
        fields["template"] = None
    elif fields["template"] is None and len(templates) == 1:
        fields["template"] = {"name": templates[0][0], "source": templates[0][1]}
    seed = _common(list(seen.seeds) or [m.seed for m in mans])
    settings: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in mans for k in m.settings):
        value = _common([m.settings.get(key, _MISSING) for m in mans])
        if value is not _MISSING:
            settings[key] = value
    settings.setdefault("shard", None)
    runs: list[RunEntry] = []
    for info in report.inputs:
        for run in info.manifest.runs if info.manifest is not None else []:
            data = run.model_dump(mode="json")
            data.setdefault("input", info.path)
            runs.append(RunEntry.model_validate(data))
    merge: dict[str, Any] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "dedup": report.dedup,
            "threshold": report.threshold if report.dedup else None,
            "semantic_model": report.semantic_model,
            "semantic_threshold": report.semantic_threshold if report.semantic_model else None,
            "num_perm": index.num_perm if index is not None else None,
            "shingle_size": index.shingle_size if index is not None else None,
            "allow_mixed": allow_mixed,
        },
        "counts": report.counts(),
        "inputs": [_input_entry(i) for i in report.inputs],
        "notes": [i.note for i in report.inputs if i.note],
    }
    return Manifest(
        output=output.name,
        magpie_version=__version__,
        settings=settings,
        seed=None if seed is _MISSING else seed,
        records=report.kept,
        runs=runs,
        kind="merge",
        merge=merge,
        **fields,
    )


def _input_entry(info: InputReport) -> dict[str, Any]:
    man = info.manifest
    return {
        "path": info.path,
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "sha256": info.sha256,
        "records": info.records,
        "kept": info.kept,
        "exact": info.exact,
        "near": info.near,
        "semantic": info.semantic,
        "id_collisions": info.id_collisions,
        "manifest": None
        if man is None
        else {
            "path": manifest_path(Path(info.path)).name,
            "kind": getattr(man, "kind", None) or "generate",
            "magpie_version": man.magpie_version,
            "backend": man.backend,
            "host": man.host,
            "model": man.model,
            "model_digest": man.model_digest,
            "template": _template_name(man),
            "shard": man.settings.get("shard"),
            "seed": man.seed,
            "records": man.records,
            "runs": len(man.runs),
        },
        "note": info.note,
    }
