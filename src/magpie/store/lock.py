"""One writer per output: an exclusive lock on the output file itself.

The lock is ``flock(2)`` on the file's inode, so every name of the file (a
symlink, a hard link, a relative path) meets the same lock, and the kernel
releases it when the process dies, even by SIGKILL: a crashed run never leaves a
stale lock behind, and no ``.lock`` file is left beside the output.

An output that does not exist yet is created empty to hold the lock, and removed
again at release if it is still empty (a run that failed before its first
record leaves nothing behind).  POSIX only (Linux, macOS).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from magpie.errors import ExitStatus, MagpieError


class OutputLocked(MagpieError):
    """Another run holds the output's lock (exit 4)."""

    exit_status = ExitStatus.LOCKED


class OutputLock:
    """``with OutputLock(path):`` holds ``path``'s lock or raises OutputLocked at once.

    ``what`` names the file in the message (``output``, ``input``).  With
    ``create=False`` a file that does not exist is not created and not locked
    (for an output that is replaced atomically: there is nothing to append to).
    """

    def __init__(self, output: Path, what: str = "output", *, create: bool = True) -> None:
        self.path = Path(output)
        self._what = what
        self._create = create
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        from magpie.store.targets import kind_of

        if kind_of(self.path) is not None:
            return  # a directory, FIFO or device: nothing to lock (its check refuses it)
        try:
            try:
                if not self._create:
                    raise FileExistsError
                fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            if not self._create:
                return
            raise MagpieError(
                f"cannot create {self._what} {self.path}: its directory does not exist",
                exit_status=ExitStatus.USAGE,
            ) from None
        except OSError as exc:
            raise MagpieError(
                f"cannot open {self._what} {self.path} to lock it: {exc.strerror}",
                exit_status=ExitStatus.USAGE,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputLocked(
                    f"another magpie run is writing {self.path}: "
                    "wait for it to finish, or pick another --output"
                ) from None
            raise MagpieError(
                f"cannot lock {self._what} {self.path}: {exc.strerror}",
                exit_status=ExitStatus.USAGE,
            ) from None
        self._fd = fd

    def keep(self) -> None:
        """Keep the file at release even if empty (an answer: nothing kept)."""
        self._created = False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            held = os.fstat(self._fd)
            if self._created and held.st_size == 0:
                # Still the empty file this lock made: leave nothing behind.
                try:
                    now = os.stat(self.path)
                    if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                        self.path.unlink()
                except OSError:
                    pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
