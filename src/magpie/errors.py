"""Exit statuses and the exceptions that carry them.

Every error a user can cause or meet is a :class:`MagpieError` with a one-line
message that says what to do.  The CLI prints that line (a traceback only under
``--debug``) and exits with the error's :class:`ExitStatus`.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Documented process exit codes of the ``magpie`` command."""

    OK = 0
    #: The run started but failed (a backend error that retries did not cure, a bug).
    ERROR = 1
    #: Bad usage or bad input: flags, config file, paths, input files.
    USAGE = 2
    #: The backend is unreachable or the model is missing.
    BACKEND_UNAVAILABLE = 3
    #: Another magpie run holds the lock on the same output.
    LOCKED = 4
    #: Interrupted by SIGINT (Ctrl-C).
    INTERRUPTED = 130
    #: Stopped by SIGTERM.
    TERMINATED = 143


class MagpieError(Exception):
    """An error with a one-line, user-facing message and an exit status.

    ``fix``, when given, says what to do; the one line is ``message: fix``
    (``magpie doctor`` shows the two apart)."""

    exit_status: ExitStatus = ExitStatus.ERROR

    def __init__(
        self, message: str, *, exit_status: ExitStatus | None = None, fix: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_status is not None:
            self.exit_status = exit_status

    def __str__(self) -> str:  # one line, always
        text = f"{self.message}: {self.fix}" if self.fix else self.message
        return " ".join(text.split("\n"))


class UsageError(MagpieError):
    """Bad flags, config values, paths or input files (exit 2)."""

    exit_status = ExitStatus.USAGE


class BackendUnavailable(MagpieError):
    """The backend cannot be reached (exit 3)."""

    exit_status = ExitStatus.BACKEND_UNAVAILABLE


class ModelNotFound(MagpieError):
    """The backend is up but the model is not there (exit 3)."""

    exit_status = ExitStatus.BACKEND_UNAVAILABLE


class BackendError(MagpieError):
    """A request failed in a way that is worth retrying (5xx, 429, timeouts, resets).

    ``retryable`` says whether a retry may help; ``cause`` is a short label used in
    counters ("http_503", "timeout", "connection", "empty", "stream_error").
    """

    exit_status = ExitStatus.ERROR

    def __init__(self, message: str, *, retryable: bool = True, cause: str = "error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.cause = cause


class ContextOverflow(BackendError):
    """The prompt (with the answer asked for, where the server counts it) does
    not fit the model's context, and the server refused it rather than cut it.

    Never retryable: the same request overflows again.  ``prompt_tokens`` and
    ``context`` are the server's counts where it gave them (None where not);
    ``fix`` says how to raise the context on this backend.  The pipeline turns
    it into the rejection ``context_overflow``, its one line as the detail.
    """

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        context: int | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message, retryable=False, cause="context_overflow")
        self.prompt_tokens = prompt_tokens
        self.context = context
        self.fix = fix


class OutputClosed(MagpieError):
    """The reader of stdout went away (``magpie generate -o - | head``)."""

    exit_status = ExitStatus.OK


class TemplateError(UsageError):
    """No pre-query template could be found or derived (exit 2)."""


def os_error_line(exc: OSError) -> tuple[str, ExitStatus]:
    """One line, and the exit status, for an error of the system (disk full, a
    read-only file system, a closed or unwritable stdout)."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on the device{where}: free some space and rerun "
            "(generate and filter resume where they stopped)",
            ExitStatus.ERROR,
        )
    if exc.errno == errno.EFBIG:
        return (
            f"file size limit reached{where} (ulimit -f): raise it and rerun",
            ExitStatus.ERROR,
        )
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}: free some space and rerun", ExitStatus.ERROR
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{(exc.strerror or 'denied').lower()}{where}: pick a path you can write", (
            ExitStatus.USAGE
        )
    if exc.errno == errno.EBADF:
        return (
            "a file descriptor is closed (stdout or stdin?): redirect it, or give files "
            "(-o FILE) instead of -",
            ExitStatus.USAGE,
        )
    return f"{exc.strerror or exc.__class__.__name__}{where}", ExitStatus.ERROR


class WriteFailed(MagpieError):
    """The system refused to write a file (disk full, I/O error); what was
    written before is intact and a rerun resumes (exit 1, or 2 for a path
    that cannot be written at all)."""

    @classmethod
    def from_os_error(cls, exc: OSError, path: object) -> WriteFailed:
        exc.filename = None  # the path leads the line already
        line, status = os_error_line(exc)
        return cls(f"cannot write {path}: {line}", exit_status=status)
