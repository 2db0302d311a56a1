"""One writer per output: an exclusive lock file next to it (``<output>.lock``).

Uses ``filelock`` (an OS-level lock: released by the kernel when the process
dies, even by SIGKILL, so a crashed run never leaves a stale lock behind).
"""

from __future__ import annotations

from pathlib import Path

from magpie.errors import ExitStatus, MagpieError


class OutputLocked(MagpieError):
    """Another run holds the output's lock (exit 4)."""

    exit_status = ExitStatus.LOCKED


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """``with OutputLock(path):`` holds ``<path>.lock`` or raises OutputLocked at once."""

    def __init__(self, output: Path) -> None:
        from filelock import FileLock

        self.path = lock_path(output)
        self._output = output
        self._lock = FileLock(str(self.path), timeout=0)

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise OutputLocked(
                f"another magpie run is writing {self._output} (lock {self.path} is held): "
                "wait for it to finish, or pick another --output"
            ) from None
        except OSError as exc:
            raise MagpieError(
                f"cannot create the lock file {self.path}: {exc.strerror}",
                exit_status=ExitStatus.USAGE,
            ) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
