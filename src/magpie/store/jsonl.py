"""The dataset's JSONL: the one reader of record files, and the writers.

* :class:`RecordReader` (and :func:`read_records`) is the one reader of record
  files: streamed line by line, a torn last line and a line that is not a
  record handled (and the error worded, :func:`record_error`) in one place;
  :func:`read_objects` reads the lenient lines of a rejects file.  Reading never
  changes the file.
* :func:`scan_output` reads an existing output (read-only) and says how many
  valid records it holds and where a top-up run continues.  A file that is not a
  magpie JSONL is refused (exit 2), never touched.
* :class:`JsonlWriter` appends one record per ``write()`` call as a single
  ``os.write`` of a complete line, flushed at once and fsynced every
  ``fsync_every`` records and at close.  A torn last line left by a hard kill is
  moved to ``<output>.torn`` before anything is appended.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

from pydantic import ValidationError

from magpie.errors import OutputClosed, UsageError, WriteFailed
from magpie.records import Record, Rejection
from magpie.store.dataset import TORN_SUFFIX, Dataset, sidecar
from magpie.store.targets import STDIO, Targets, stdin_bytes, stdout_bytes

#: How every record line starts (``schema_version`` is Record's first field):
#: a torn first line that does not start so is not a torn record.
_RECORD_START = b'{"schema_version":'


# -- reading -----------------------------------------------------------------

#: What the reader does with a last line that has no newline and is no record:
#: ``"error"`` refuses the file (a command reading its input); ``"stop"`` ends
#: there and keeps it in :attr:`RecordReader.torn` (a torn write by a hard kill:
#: ``generate`` sets it aside, the dedup index ignores it).
TornPolicy = Literal["error", "stop"]


class RecordLine(NamedTuple):
    """One record line: its number (from 1), its bytes as read, the record."""

    lineno: int
    raw: bytes
    record: Record


def record_error_detail(exc: Exception) -> str:
    """Why a line is not a record, in a few words (the first validation error)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(x) for x in err['loc']) or 'record'}: {err['msg']}"
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


def record_error(
    name: str, lineno: int, exc: Exception, *, torn: bool = False, then: str | None = None
) -> UsageError:
    """The one message for a line that is not a record (exit 2).

    With ``then`` (what the command does about it: ``nothing written``):
    ``NAME is not a magpie JSONL (line N: DETAIL); THEN``; without it, for a
    converter of records: ``NAME line N is not a magpie record (DETAIL)``.
    ``torn``: the line is a last line without a newline (an incomplete write).
    """
    detail = record_error_detail(exc)
    if then is None:
        note = "; an incomplete last line" if torn else ""
        return UsageError(f"{name} line {lineno} is not a magpie record ({detail}{note})")
    note = ", an incomplete last line" if torn else ""
    return UsageError(f"{name} is not a magpie JSONL (line {lineno}{note}: {detail}); {then}")


def open_lines(source: Path | str) -> Iterator[bytes]:
    """The lines of ``source`` (``-``: stdin), as bytes, one at a time; opened
    read-only (a file read is never changed), closed when the iterator ends or
    is closed.  A file that cannot be opened is a UsageError."""
    if str(source) == STDIO:
        yield from stdin_bytes()
        return
    path = Path(source)
    try:
        fh: BinaryIO = path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a JSONL file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        yield from fh


class RecordReader:
    """The one reader of record files: ``for line in RecordReader(src): ...``.

    ``source`` is a path (``-``: stdin) or any iterable of byte lines (an open
    file, a stream); it is read one line at a time, never whole.  Each record
    line comes as a :class:`RecordLine` (a version 1 record upgraded, as
    :class:`~magpie.records.Record` reads it); blank lines are skipped.  A line
    that is not a record raises :func:`record_error` (``name`` and ``then``
    make its message), except a torn last line with ``torn="stop"``: reading
    ends there and the line is kept in :attr:`torn`.  A torn *first* line that
    does not start as a record does is never torn: it is a file of something
    else (a one-line note), and refused.

    While it reads, :attr:`good_bytes` is the offset just after the last
    whole line (records and blank lines) and :attr:`records` the records read.
    """

    def __init__(
        self,
        source: Path | str | Iterable[bytes],
        name: str | None = None,
        *,
        torn: TornPolicy = "error",
        then: str | None = None,
    ) -> None:
        self._source = source
        self.name = name if name is not None else str(source)
        self._policy = torn
        self._then = then
        self.good_bytes = 0
        self.records = 0
        self.torn = b""

    def __iter__(self) -> Generator[RecordLine, None, None]:
        source = self._source
        lines = open_lines(source) if isinstance(source, str | Path) else source
        for lineno, raw in enumerate(lines, start=1):
            whole = raw.endswith(b"\n")
            if not raw.strip() and (whole or self._policy == "error"):
                self.good_bytes += len(raw) if whole else 0
                continue
            try:
                rec = Record.model_validate_json(raw)
            except (ValidationError, ValueError) as exc:
                if whole or self._policy == "error":
                    raise record_error(
                        self.name, lineno, exc, torn=not whole, then=self._then
                    ) from None
                if not self.records and not raw.startswith(_RECORD_START):
                    raise record_error(self.name, lineno, exc, then=self._then) from None
                self.torn = raw
                return
            self.good_bytes += len(raw)
            self.records += 1
            yield RecordLine(lineno, raw, rec)


def read_records(
    source: Path | str | Iterable[bytes],
    name: str | None = None,
    *,
    torn: TornPolicy = "error",
    then: str | None = None,
) -> Generator[Record, None, None]:
    """The records of ``source``, streamed (see :class:`RecordReader`)."""
    for line in RecordReader(source, name, torn=torn, then=then):
        yield line.record


def read_objects(
    source: Path | str | Iterable[bytes],
) -> Generator[dict[str, Any] | None, None, None]:
    """Each non-blank line of a JSONL that is not (only) records, such as a
    rejects file, parsed leniently: a JSON object, or None when the line is not
    one (its reader counts or skips those)."""
    lines = open_lines(source) if isinstance(source, str | Path) else source
    for raw in lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            yield None
            continue
        yield obj if isinstance(obj, dict) else None


@dataclass
class ExistingOutput:
    """What an existing output file holds."""

    path: Path | None
    count: int = 0
    next_index: int = 0
    seed: int | None = None
    model: str | None = None
    template: str | None = None
    #: Byte offset just after the last complete line.
    good_bytes: int = 0
    #: Bytes after the last newline that do not form a record (a torn write).
    torn: bytes = b""
    ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    #: Records by the judge's task category (``--balance`` counts them).
    categories: Counter[str] = field(default_factory=Counter)


def run_targets(
    output: str,
    rejects: str | None,
    *,
    overwrite: bool = False,
    inputs: Sequence[tuple[str, Path | str]] = (),
) -> Targets:
    """The files of a command that appends records (``generate``, ``filter``):
    its ``inputs``, its output (with the sidecars magpie keeps beside it) and
    ``--rejects``, for :class:`~magpie.store.targets.Targets`' one check and lock."""
    targets = Targets(overwrite=overwrite)
    for what, path in inputs:
        targets.read(what, path)
    sidecars = Dataset(Path(output).expanduser()).sidecars() if output != STDIO else None
    targets.append("output", output, sidecars=sidecars)
    targets.append("--rejects", rejects)
    return targets


def check_run_targets(targets: Targets) -> None:
    """:meth:`Targets.check`, and an existing ``--rejects`` must be a rejects
    file: rejects are never appended to a dataset or to a file of something else."""
    targets.check()
    rejects = targets.get("--rejects")
    if rejects is not None and rejects.path is not None:
        check_rejects_file(rejects.path)


def check_output_path(output: str) -> Path | None:
    """Validate ``--output`` before any work starts (exit 2 on a bad path)."""
    targets = run_targets(output, None)
    targets.check()
    return targets["output"].path


def check_rejects_file(p: Path) -> None:
    """Refuse an existing ``--rejects`` file that is not a rejects file (exit 2)."""
    if p.exists() and p.stat().st_size:
        with p.open("rb") as fh:
            first = fh.readline(1 << 20)
        try:
            obj = json.loads(first)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or "reject_reason" not in obj:
            raise UsageError(
                f"--rejects {p} is not a magpie rejects file (its first line has no "
                "reject_reason); refusing to append to it: pick another --rejects"
            )


#: What ``generate`` and ``filter`` say of an output that is not theirs.
_NOT_YOURS = "refusing to touch it: pick another --output, or pass --overwrite to replace it"


def scan_output(path: Path | None) -> ExistingOutput:
    """Read an existing output without changing it."""
    result = ExistingOutput(path=path)
    if path is None or not path.exists() or path.stat().st_size == 0:
        return result
    reader = RecordReader(path, str(path), torn="stop", then=_NOT_YOURS)
    for line in reader:
        _count(result, line.record)
    result.good_bytes, result.torn = reader.good_bytes, reader.torn
    return result


def _count(result: ExistingOutput, rec: Record) -> None:
    if rec.id in result.ids:
        result.duplicates += 1
        return
    result.ids.add(rec.id)
    result.count += 1
    result.next_index = max(result.next_index, rec.index + 1)
    result.seed, result.model, result.template = rec.seed, rec.model, rec.template
    if rec.judge is not None and rec.judge.task_category is not None:
        result.categories[rec.judge.task_category] += 1


class JsonlWriter:
    """Append records to a file (or stdout), one complete line per write."""

    def __init__(
        self,
        path: Path | None,
        *,
        overwrite: bool = False,
        existing: ExistingOutput | None = None,
        fsync_every: int = 64,
        stdout: BinaryIO | None = None,
    ) -> None:
        self.path = path
        self.overwrite = overwrite
        self.existing = existing
        self.fsync_every = max(1, fsync_every)
        self._stdout = stdout
        self._fd: int | None = None
        self._since_sync = 0
        self.written = 0
        self.torn_path: Path | None = None

    def _open(self) -> None:
        """Open lazily, at the first record: a run that fails before it leaves
        the old file (and --overwrite) untouched."""
        assert self.path is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        if self.overwrite:
            flags |= os.O_TRUNC
        fd = os.open(self.path, flags, 0o644)
        ex = self.existing
        if not self.overwrite and ex is not None and (ex.torn or ex.good_bytes < _size(fd)):
            self._set_aside(fd, ex)
        self._fd = fd

    def _set_aside(self, fd: int, ex: ExistingOutput) -> None:
        assert self.path is not None
        with open(self.path, "rb") as fh:
            fh.seek(ex.good_bytes)
            tail = fh.read()
        if tail:
            self.torn_path = sidecar(self.path, TORN_SUFFIX)
            with open(self.torn_path, "ab") as t:
                t.write(tail if tail.endswith(b"\n") else tail + b"\n")
                t.flush()
                os.fsync(t.fileno())
        os.ftruncate(fd, ex.good_bytes)
        os.fsync(fd)

    def prepare(self) -> Path | None:
        """Set a torn tail aside now (before a run), returning where it went."""
        if self.path is not None and self._fd is None and self.existing and self.existing.torn:
            self._open()
        return self.torn_path

    def write(self, record: Record) -> None:
        data = (record.model_dump_json() + "\n").encode("utf-8")
        if self.path is None:
            out = self._stdout or stdout_bytes()
            try:
                out.write(data)
                out.flush()
            except BrokenPipeError:
                raise OutputClosed("stdout was closed by its reader") from None
            self.written += 1
            return
        try:
            if self._fd is None:
                self._open()
        except OSError as exc:
            raise WriteFailed.from_os_error(exc, self.path) from None
        assert self._fd is not None
        _append_line(self._fd, data, self.path)
        self._since_sync += 1
        if self._since_sync >= self.fsync_every:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise WriteFailed.from_os_error(exc, self.path) from None
            self._since_sync = 0
        self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass  # every record was written whole; the kernel still has them
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _append_line(fd: int, data: bytes, path: Path) -> None:
    """Append one whole line to ``fd`` (opened O_APPEND), or nothing: a write
    the system refuses half-way (a full disk) is taken back, so the file ends
    with its last whole line (a rerun resumes from it); WriteFailed then."""
    try:
        before = os.fstat(fd).st_size
    except OSError as exc:
        raise WriteFailed.from_os_error(exc, path) from None
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        with contextlib.suppress(OSError):  # else left torn: the next run sets it aside
            os.ftruncate(fd, before)
        raise WriteFailed.from_os_error(exc, path) from None


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


class RejectsWriter:
    """Appends rejected attempts to a JSONL file (``--rejects``), one line each.

    A rejection after the response carries the whole record; earlier ones carry
    the instruction.  Every line has ``reject_reason``, ``reject_stage`` and
    ``reject_detail``.
    """

    def __init__(self, path: Path, *, afresh: bool = False) -> None:
        self.path = path
        self._fd: int | None = None
        if afresh:
            # Emptied in place: the file (and the lock on it) stays.
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
            except OSError as exc:
                raise WriteFailed.from_os_error(exc, path) from None

    def write(self, item: Rejection | Record, *, reason: str = "", **context: object) -> None:
        if isinstance(item, Record):
            data: dict[str, object] = item.model_dump(mode="json")
            data.update(reject_reason=reason, reject_stage="filter", reject_detail="")
        elif item.record is not None:
            data = item.record.model_dump(mode="json")
            data.update(
                reject_reason=item.reason, reject_stage=item.stage, reject_detail=item.detail
            )
        else:
            data = {
                "index": item.index,
                "instruction": item.text,
                **context,
                "reject_reason": item.reason,
                "reject_stage": item.stage,
                "reject_detail": item.detail,
            }
        line = (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise WriteFailed.from_os_error(exc, self.path) from None
        _append_line(self._fd, line, self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
