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
    """An error with a one-line, user-facing message and an exit status."""

    exit_status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, *, exit_status: ExitStatus | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_status is not None:
            self.exit_status = exit_status

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


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


class OutputClosed(MagpieError):
    """The reader of stdout went away (``magpie generate -o - | head``)."""

    exit_status = ExitStatus.OK


class TemplateError(UsageError):
    """No pre-query template could be found or derived (exit 2)."""
