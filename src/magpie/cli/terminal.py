"""One place for what a command meets at the terminal: one-line errors with
their exit codes, data lines on stdout, a stdout whose reader went away, and
SIGTERM."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, TextIO

import typer

from magpie.errors import ExitStatus, MagpieError, OutputClosed, os_error_line
from magpie.store.targets import stdout_bytes


def err(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def fail(exc: BaseException, debug: bool) -> typer.Exit:
    """Report an error as one line (a traceback only with --debug)."""
    if _sigterm_seen:
        # SIGTERM raised Terminated wherever the command was; code that wraps
        # what it catches (pydantic turns an exception of a serializer into
        # PydanticSerializationError) may hand it on as another error: the
        # command still ends as terminated (143), without a line of its own.
        return typer.Exit(int(ExitStatus.TERMINATED))
    if isinstance(exc, (BrokenPipeError, OutputClosed)):
        # `magpie ... -o - | head`: the reader has what it wanted; not an error.
        _silence_stdout()
        return typer.Exit(int(ExitStatus.OK))
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, MagpieError):
        err(f"magpie: error: {exc}")
        return typer.Exit(int(exc.exit_status))
    if isinstance(exc, OSError) and exc.errno is not None:
        line, status = os_error_line(exc)
        err(f"magpie: error: {line}")
        return typer.Exit(int(status))
    first = (str(exc).strip().splitlines() or [""])[0]
    err(f"magpie: error: {exc.__class__.__name__}: {first} (run with --debug for a traceback)")
    return typer.Exit(int(ExitStatus.ERROR))


def _flush_stdout() -> int | None:
    """Flush what stdout still buffers; the exit status when that fails."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        line, status = os_error_line(exc)
        err(f"magpie: error: cannot write to stdout: {line}")
        _silence_stdout()
        return int(status)
    return None


def _silence_stdout() -> None:
    """The reader of stdout went away (``magpie stats | head``): send what is
    still buffered to /dev/null, so that exiting does not fail on it."""
    if sys.stdout is None:
        return
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # a stream of no file (``run(stdout=...)``)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


#: What to do about a closed stdout, for a command that prints its answer.
_CLOSED_HINT = "redirect it to a file (> FILE) or a pipe to keep what this command prints"


def stdout_text() -> TextIO:
    """stdout for text: the one way a command's data reaches it (:func:`out`,
    the Rich console of :func:`_stdout_console`); a stdout the shell closed
    (``>&-``) is one line and exit 2 (:func:`magpie.store.targets.stdout_bytes`,
    the same check the writers of ``-o -`` use)."""
    try:
        stdout_bytes(_CLOSED_HINT)
    except MagpieError as exc:
        raise fail(exc, debug=False) from None
    return sys.stdout


def out(line: str, *, gone: int = ExitStatus.OK) -> None:
    """One line of data on stdout; a reader gone away ends the command quietly,
    exit ``gone`` (0; ``doctor`` keeps its verdict)."""
    stream = stdout_text()
    try:
        stream.write(line + "\n")
        stream.flush()
    except BrokenPipeError:
        _silence_stdout()
        raise typer.Exit(int(gone)) from None


def _stdout_console(**kwargs: Any) -> Any:
    """A Rich console on stdout that exits 0 when its reader goes away (Rich's
    own exits 1)."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            _silence_stdout()
            raise typer.Exit(0)

    return StdoutConsole(file=stdout_text(), **kwargs)


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its clean-up runs (the
    temporary file of an output is removed) before exit 143."""


#: Whether SIGTERM arrived (see :func:`fail`).
_sigterm_seen = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _sigterm_seen
    _sigterm_seen = True
    raise Terminated
