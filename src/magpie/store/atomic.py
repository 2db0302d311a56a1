"""Files replaced atomically: written under a temporary name beside the target,
flushed to disk, renamed into place, and the directory entry synced.

A reader (or a crash) sees the old file or the new one, never half of one.
A process killed mid-write (SIGKILL) leaves its temporary file: the next
writer of the same file removes it (the PID in its name is gone).
The manifest, the dedup index cache, ``magpie dedup``/``merge``/``export``
outputs (the SQLite file too) and the HTML stats report are all written this
way: :class:`AtomicFile` is the one atomic writer of a file.  (The Hugging Face
folder of ``export --format hf`` is a directory: it is built under a temporary
name and renamed the same way, in :mod:`magpie.commands.publish.folder`.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any

from magpie.errors import UsageError
from magpie.store.targets import STDIO, check_target, stdout_bytes


def fsync_dir(path: Path) -> None:
    """Persist a rename in directory ``path`` (best effort: some systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` left by a killed process
    (``.NAME.PID.XXXX.tmp`` whose PID is gone); a live writer's are kept."""
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    try:
        candidates = list(parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid_text = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class AtomicFile:
    """``path``'s new content, under a temporary name until :meth:`commit`.

    Opening creates the temporary file (an ``OSError`` then means the directory
    is not writable).  As a context manager it yields the file object, commits
    when the block ends normally and removes the temporary file otherwise.
    ``mode``: permissions to give the file (default 0644, as every magpie output;
    ``mkstemp`` alone makes it 0600).  A symlinked ``path`` is written through:
    the file it points to is replaced and the link stays.
    """

    def __init__(self, path: Path | str, *, text: bool = False, mode: int | None = 0o644) -> None:
        from magpie.store.targets import write_path

        self.path = write_path(Path(path))
        self._mode = mode
        parent = self.path.parent if str(self.path.parent) else Path(".")
        sweep_stale(self.path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=parent
        )
        self._tmp: Path | None = Path(tmp)
        self.fh: IO[Any] = os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")

    @property
    def tmp_path(self) -> Path:
        """The temporary file, for a writer that opens it by name (SQLite): its
        bytes are synced and renamed into place by :meth:`commit` all the same."""
        assert self._tmp is not None, "already committed or aborted"
        return self._tmp

    def commit(self) -> None:
        """Flush, fsync and rename into place."""
        assert self._tmp is not None, "already committed or aborted"
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self._mode is not None:
            os.chmod(self._tmp, self._mode)
        os.replace(self._tmp, self.path)
        self._tmp = None
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Remove the temporary file, unless :meth:`commit` ran."""
        if self._tmp is not None:
            self.fh.close()
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> IO[Any]:
        return self.fh

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


class AtomicOutput:
    """A file written under a temporary name and renamed into place on commit."""

    def __init__(self, target: Path | str, overwrite: bool, what: str) -> None:
        self.what = what
        self.path: Path | None = None if str(target) == STDIO else Path(target).expanduser()
        self._file: AtomicFile | None = None
        self._fh: IO[bytes] | None = None
        if self.path is None:
            return
        check_target(self.path, what, overwrite=overwrite)

    def open(self) -> None:
        if self.path is None:
            self._fh = stdout_bytes()
            return
        try:
            # 0644, as JsonlWriter's files (mkstemp makes 0600).
            self._file = AtomicFile(self.path, mode=0o644)
        except OSError as exc:
            raise UsageError(f"{self.what} {self.path} is not writable ({exc.strerror})") from None
        self._fh = self._file.fh

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def commit(self) -> None:
        assert self._fh is not None
        if self._file is None:
            self._fh.flush()
            return
        self._file.commit()

    def abort(self) -> None:
        """Remove the temporary file if :meth:`commit` did not run."""
        if self._file is not None:
            self._file.abort()
