"""Files replaced atomically: written under a temporary name beside the target,
flushed to disk, renamed into place, and the directory entry synced.

A reader (or a crash) sees the old file or the new one, never half of one.
The manifest, the dedup index cache, ``magpie dedup``/``merge``/``export``
outputs and the HTML stats report are all written this way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any


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


class AtomicFile:
    """``path``'s new content, under a temporary name until :meth:`commit`.

    Opening creates the temporary file (an ``OSError`` then means the directory
    is not writable).  As a context manager it yields the file object, commits
    when the block ends normally and removes the temporary file otherwise.
    ``mode``: permissions to give the file (``mkstemp`` makes it 0600).
    """

    def __init__(self, path: Path | str, *, text: bool = False, mode: int | None = None) -> None:
        self.path = Path(path)
        self._mode = mode
        parent = self.path.parent if str(self.path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        self._tmp: Path | None = Path(tmp)
        self.fh: IO[Any] = os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")

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
