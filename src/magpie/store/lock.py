"""One writer per file: an exclusive lock on the file itself.

The lock is ``flock(2)`` on the target's inode, so every name of the file (a
symlink, a hard link, a relative path, a path through a symlinked folder)
meets the same lock, and the kernel releases it when the process dies, even
by SIGKILL: a crashed run never leaves a stale lock behind, and no ``.lock``
file is left beside the output.  Every command that writes a file takes it,
through :class:`magpie.store.targets.Targets`: ``generate`` and ``filter``
(which append), ``dedup``, ``merge``, ``export`` and ``stats --html`` (which
replace), ``export --format hf`` (a folder: the lock is on the directory).

A target that does not exist yet is claimed too, so that two writers of a new
name meet:

* a writer that appends creates it empty to hold the lock, and removes it at
  release if it is still that empty file (a run that failed before its first
  record leaves nothing behind);
* a writer that replaces claims it with its temporary file beside it
  (``.NAME.PID.XXXX.tmp``, the file it then writes, locked), and any writer
  of a missing name refuses it while another holds such a claim (exit 4).

The lock is checked to be on the file the name still points to: one taken on
a file that another writer renamed a new file over meanwhile is dropped and
taken again on the new one.  A writer that replaces its target locks the new
file before renaming it over the old (:meth:`OutputLock.adopt`), so the name
is never unlocked while the command runs.  POSIX only (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from pathlib import Path

from magpie.errors import ExitStatus, MagpieError

#: Tries to lock a name whose file keeps being replaced under us.
_TRIES = 20
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class OutputLocked(MagpieError):
    """Another run holds the output's lock (exit 4)."""

    exit_status = ExitStatus.LOCKED


class OutputLock:
    """``with OutputLock(path):`` holds ``path``'s lock or raises OutputLocked at once.

    ``what`` names the file in the message (``output``, ``--rejects``).
    ``create=False``: a missing file is not created nor claimed (an input).
    ``replace``: the writer replaces the target, so a missing one is claimed
    by a temporary file beside it (:attr:`tmp`, for the writer to fill)
    rather than created empty.  ``folder``: the target is a directory.
    """

    def __init__(
        self,
        output: Path | str,
        what: str = "output",
        *,
        create: bool = True,
        replace: bool = False,
        folder: bool = False,
    ) -> None:
        self.path = Path(output)
        self._what = what
        self._create = create
        self._replace = replace
        self._folder = folder
        self._fd: int | None = None
        self._more: list[int] = []
        #: The lock made the (empty) target itself.
        self.created = False
        #: The temporary file (folder) that claims a missing target.
        self.tmp: Path | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self.tmp is not None

    @property
    def existed(self) -> bool:
        """Whether the target was there before this lock."""
        return self._fd is not None and not self.created

    def acquire(self) -> None:
        from magpie.store.targets import kind_of

        kind = kind_of(self.path)
        if kind is not None and not (self._folder and kind == "a directory"):
            return  # a FIFO or device: nothing to lock (its check refuses it)
        real = Path(os.path.realpath(self.path))  # a dangling symlink: what it names
        try:
            if self._create and self._replace and not os.path.lexists(real):
                self._claim(real)
            self._lock_name(real)
            if self._create and (self.created or self._fd is None) and _claimed(real, self.tmp):
                raise OutputLocked(self._busy())
        except BaseException:
            self.release()
            raise

    def _busy(self) -> str:
        other = self._what if self._what.startswith("--") else "--output"
        return (
            f"another magpie run is writing {self.path}: "
            f"wait for it to finish, or pick another {other}"
        )

    def _claim(self, real: Path) -> None:
        """Claim the missing ``real`` with a locked temporary file beside it.

        Its name is kept before it is made, so that a signal at any point
        leaves nothing :meth:`release` does not remove."""
        for _ in range(100):
            self.tmp = real.parent / f".{real.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                if self._folder:
                    os.mkdir(self.tmp, 0o755)
                else:
                    os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                continue
            except FileNotFoundError:
                self.tmp = None
                raise self._error(
                    f"cannot create {self._what} {self.path}: its directory does not exist"
                ) from None
            except OSError as exc:
                self.tmp = None
                raise self._error(
                    f"{self._what} {self.path} is not writable ({exc.strerror}): pick another path"
                ) from None
            self.adopt(self.tmp)
            return
        raise self._error(f"cannot create a temporary file beside {self.path}")

    def _lock_name(self, real: Path) -> None:
        """Lock the file at ``real`` (created empty first where asked)."""
        for _ in range(_TRIES):
            fd = self._open(real)
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                self.created = False
                if exc.errno in _BUSY:
                    raise OutputLocked(self._busy()) from None
                raise self._error(f"cannot lock {self._what} {self.path}: {exc.strerror}") from None
            if _names(self.path, fd):
                self._fd = fd
                return
            # Replaced (renamed over, removed) between open and flock: the lock
            # is on a file no longer at this name.  Take it on the one there now.
            os.close(fd)
            self.created = False
        raise self._error(f"cannot lock {self._what} {self.path}: it keeps being replaced")

    def _open(self, real: Path) -> int | None:
        """The target opened for its lock (created empty if missing and the
        writer appends), or None when it is missing and not to be created."""
        flags = os.O_RDONLY | (os.O_DIRECTORY if self._folder else os.O_NONBLOCK)
        try:
            if self._create and not self._replace:
                try:
                    fd = os.open(real, flags | os.O_CREAT | os.O_EXCL, 0o644)
                    self.created = True
                    return fd
                except FileExistsError:
                    pass
            return os.open(real, flags)
        except FileNotFoundError:
            if not self._create or self._replace:
                return None
            raise self._error(
                f"cannot create {self._what} {self.path}: its directory does not exist"
            ) from None
        except OSError as exc:
            raise self._error(
                f"{self._what} {self.path} is not writable ({exc.strerror}): pick another path"
                if self._create
                else f"cannot open {self._what} {self.path} to lock it: {exc.strerror}"
            ) from None

    def _error(self, message: str) -> MagpieError:
        return MagpieError(message, exit_status=ExitStatus.USAGE)

    def adopt(self, path: Path | str) -> None:
        """Lock ``path`` too (the new file about to be renamed over the target),
        held until :meth:`release`: the name stays locked across the rename."""
        flags = os.O_RDONLY | (os.O_DIRECTORY if self._folder else os.O_NONBLOCK)
        fd = os.open(path, flags)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._more.append(fd)

    def keep(self) -> None:
        """Keep the file at release even if empty (an answer: nothing kept)."""
        self.created = False

    def release(self) -> None:
        try:
            if self._fd is not None and self.created:
                self._remove_placeholder(self._fd)
            if self.tmp is not None:
                # A claim the writer never renamed into place (it failed).
                with contextlib.suppress(OSError):
                    if self.tmp.is_dir():
                        shutil.rmtree(self.tmp)
                    else:
                        self.tmp.unlink()
        finally:
            for fd in (self._fd, *self._more):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd, self._more, self.created, self.tmp = None, [], False, None

    def _remove_placeholder(self, fd: int) -> None:
        """Remove the empty file this lock made, if it is still that."""
        with contextlib.suppress(OSError):
            if _names(self.path, fd) and os.fstat(fd).st_size == 0:
                os.unlink(os.path.realpath(self.path))

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` (symlinks followed) still names the file open as ``fd``."""
    try:
        now, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _claimed(real: Path, own: Path | None) -> bool:
    """Whether another live writer claims the missing ``real`` with a locked
    temporary file (``.NAME.PID.XXXX.tmp``) beside it."""
    head = f".{real.name}."
    try:
        names = os.listdir(real.parent)
    except OSError:
        return False
    for name in names:
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        if not name[len(head) :].split(".", 1)[0].isdigit():
            continue  # another file's (".NAME.manifest.json.PID...")
        tmp = real.parent / name
        if own is not None and tmp == own:
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return True
        finally:
            os.close(fd)
    return False
