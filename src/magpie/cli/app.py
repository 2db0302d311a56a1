"""The ``magpie`` command: a thin Typer layer over the library.

stdout carries data only (JSONL); progress, logs and the summary go to stderr.
Exit codes are :class:`magpie.errors.ExitStatus`.  This module is the table of
commands; each lives in the module named after what it does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TextIO

import typer

from magpie import __version__
from magpie.cli import files, generate, info, publish
from magpie.cli.terminal import (
    Terminated,
    _flush_stdout,
    _on_sigterm,
    _silence_stdout,
    err,
    fail,
    out,
)
from magpie.errors import ExitStatus, MagpieError, os_error_line

app = typer.Typer(
    name="magpie",
    help="Create instruction-tuning datasets from local LLMs with the Magpie method.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
templates_app = typer.Typer(
    help="List and show the pre-query template families.", no_args_is_help=True
)
app.add_typer(templates_app, name="templates")


def _version(value: bool) -> None:
    if value:
        out(f"magpie {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Create instruction-tuning datasets from local LLMs with the Magpie method.

    Exit codes: 0 done; 1 failure during the run; 2 bad usage or input;
    3 backend unreachable or model missing; 4 output locked by another run;
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
    """


app.command()(generate.generate)
app.command("filter")(files.filter_cmd)
app.command()(files.dedup)
app.command()(files.merge)
app.command()(info.stats)
app.command()(info.doctor)
templates_app.command("list")(info.templates_list)
templates_app.command("show")(info.templates_show)
app.command()(files.export)
app.command()(publish.card)


def run(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """The ``magpie`` command in this process: its exit status.

    ``argv`` (default ``sys.argv[1:]``); ``stdin``, ``stdout``, ``stderr``
    stand in for the process's streams while it runs (text streams; a
    command that reads or writes bytes uses their ``buffer``), and ``env``
    for ``os.environ`` (the whole environment, not additions).  Everything
    is put back afterwards, the SIGTERM handler too (as httpie's ``main``
    takes an injected environment): tests and programs run the command
    without a new interpreter.  Usage errors too are one line, exit 2.

    SIGTERM ends a command like Ctrl-C does (generate and filter stop
    gracefully through their own handlers; the file commands unwind,
    removing their temporary files), with exit 143."""
    with _streams(stdin, stdout, stderr), _environment(env), _sigterm_handler():
        return _dispatch(list(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: :func:`run`, then exit with its status."""
    sys.exit(run(argv))


@contextlib.contextmanager
def _streams(stdin: TextIO | None, stdout: TextIO | None, stderr: TextIO | None) -> Iterator[None]:
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = stdin or sys.stdin
    sys.stdout = stdout or sys.stdout
    sys.stderr = stderr or sys.stderr
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdin, sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _sigterm_handler() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: list[str]) -> int:
    try:  # typer >= 0.29 vendors click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc  # type: ignore[no-redef]

    try:
        rv = app(args=argv, prog_name="magpie", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        return _flush_stdout() or exc.exit_code
    except click_exc.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        err(f"magpie: error: {exc.format_message()}{where}")
        return int(ExitStatus.USAGE)
    except typer.Exit as exc:
        failed = _flush_stdout()
        return failed if failed is not None and not exc.exit_code else exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return int(ExitStatus.INTERRUPTED)
    except Terminated:
        return int(ExitStatus.TERMINATED)
    except BrokenPipeError:
        _silence_stdout()
        return int(ExitStatus.OK)
    except MagpieError as exc:  # one that a command let through: still one line
        return int(fail(exc, debug=False).exit_code)
    except OSError as exc:  # stdout on a full disk (`--help > /dev/full`), ...
        line, status = os_error_line(exc)
        err(f"magpie: error: {line}")
        _silence_stdout()
        return int(status)
    failed = _flush_stdout()
    return failed if failed is not None else rv if isinstance(rv, int) else 0
