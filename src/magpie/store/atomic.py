"""Files replaced atomically: written under a temporary name beside the target,
flushed to disk, renamed into place, and the directory entry synced.

A reader (or a crash) sees the old file or the new one, never half of one.
A process killed mid-write (SIGKILL) leaves its temporary file: the next
writer of the same file removes it (the PID in its name is gone).
:class:`AtomicFile` is the one atomic writer of a file: the manifest and the
dedup index cache (sidecars, written under their dataset's lock) directly,
and every file a user names as a command's output through
:class:`AtomicOutput`, which takes a claimed
:class:`~magpie.store.targets.Target` (``magpie dedup``/``merge``/``export``
outputs, the SQLite file, the HTML stats report): its lock is moved onto the
new file before the rename, so the name stays locked throughout.
:class:`AtomicFolder` does the same for a folder (``export --format hf``).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from magpie.errors import UsageError
from magpie.store.lock import OutputLock
from magpie.store.targets import Target, refuse_foreign, stdout_bytes, write_path


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
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)  # an AtomicFolder's
            else:
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
    the file it points to is replaced and the link stays.  ``lock``: the
    target's lock, moved onto the new file before the rename.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        text: bool = False,
        mode: int | None = 0o644,
        lock: OutputLock | None = None,
    ) -> None:
        self.path = write_path(Path(path))
        self._mode = mode
        self._lock = lock
        parent = self.path.parent if str(self.path.parent) else Path(".")
        sweep_stale(self.path)
        #: The lock's claim of a missing target is the file to write.
        self._claim = lock.tmp if lock is not None else None
        if self._claim is not None:
            fd = os.open(self._claim, os.O_WRONLY | os.O_TRUNC)
            tmp = str(self._claim)
        else:
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
        if self._claim is not None:
            _put_new(self._tmp, self.path)  # locked since the claim
        else:
            if self._lock is not None:
                self._lock.adopt(self._tmp)
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


def _put_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, which was missing when it was claimed: never
    over a file that appeared there since (a hard link fails on an existing
    name; where the file system has none, a rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(
            f"{path} appeared while magpie was writing it: left as it is; "
            "run again with --overwrite to replace it"
        ) from None
    except OSError:
        os.replace(tmp, path)
        return
    os.unlink(tmp)


class AtomicOutput:
    """A claimed target's new content (stdout when its path is ``-``), written
    under a temporary name and renamed into place on :meth:`commit`."""

    def __init__(self, target: Target) -> None:
        assert target.claimed and target.mode == "replace", "claim the target first (Targets)"
        self.what = target.what
        self.path = target.path
        self._lock = target.lock
        self._file: AtomicFile | None = None
        self._fh: IO[bytes] | None = None

    def open(self) -> None:
        if self.path is None:
            self._fh = stdout_bytes()
            return
        try:
            # 0644, as JsonlWriter's files (mkstemp makes 0600).
            self._file = AtomicFile(self.path, mode=0o644, lock=self._lock)
        except OSError as exc:
            raise UsageError(f"{self.what} {self.path} is not writable ({exc.strerror})") from None
        self._fh = self._file.fh

    @property
    def tmp_path(self) -> Path:
        """The temporary file, for a writer that opens it by name (SQLite)."""
        assert self._file is not None, "open() first"
        return self._file.tmp_path

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

    def __enter__(self) -> AtomicOutput:
        self.open()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.abort()
        else:
            self.abort()


class AtomicFolder:
    """A claimed folder target's new content, built in :attr:`tmp_path` (a
    temporary folder beside it) and swapped into place on :meth:`commit`: the
    old folder, checked again to hold only the writer's own earlier output, is
    renamed away and removed after the new one is in place."""

    def __init__(self, target: Target) -> None:
        assert target.claimed and target.mode == "folder" and target.path is not None
        self.target = target
        self.path = write_path(target.path)
        lock = target.lock
        self._claimed = lock is not None and lock.tmp is not None
        if lock is not None and lock.tmp is not None:
            tmp = str(lock.tmp)  # the claim of a missing folder
        else:
            parent = self.path.parent if str(self.path.parent) else Path(".")
            sweep_stale(self.path)
            try:
                tmp = tempfile.mkdtemp(
                    prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=parent
                )
            except OSError as exc:
                raise UsageError(
                    f"{target.what} {self.path} is not writable ({exc.strerror})"
                ) from None
            os.chmod(tmp, 0o755)
        self._tmp: Path | None = Path(tmp)

    @property
    def tmp_path(self) -> Path:
        """The new folder, to fill before :meth:`commit`."""
        assert self._tmp is not None, "already committed or aborted"
        return self._tmp

    def add_file(self, name: str, text: str) -> None:
        """A file of the new folder (``name`` relative to it; its folders made)."""
        path = self.tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def commit(self) -> None:
        """Swap the finished folder into place (the old one goes after)."""
        tmp = self.tmp_path
        if self._claimed:
            try:
                os.rename(tmp, self.path)  # over nothing, or an empty folder
            except OSError as exc:
                raise UsageError(
                    f"{self.path} appeared while magpie was writing it: left as it is "
                    f"({exc.strerror}); run again with --overwrite to replace it"
                ) from None
        else:
            refuse_foreign(self.target)  # nothing crept in since the claim
            if self.target.lock is not None:
                self.target.lock.adopt(tmp)
            try:
                os.rename(tmp, self.path)  # over an empty folder: at once
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                old = self.path.with_name(f".{self.path.name}.{os.getpid()}.old.tmp")
                os.rename(self.path, old)
                os.rename(tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
        self._tmp = None
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
