"""Run the real ``magpie`` command: in this process (``magpie.cli.app.run``,
real exit codes and streams, no new interpreter) or, where the process itself
is the subject (signals, pipes, locks held by another process, crashes), in a
subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def run_magpie(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
    process: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``magpie ARGS`` with the test's environment (plus ``env``): its exit
    status, stdout and stderr.  In this process unless ``process`` (then
    ``python -m magpie`` in a subprocess, killed after ``timeout`` seconds;
    in process, pytest-timeout bounds a hang)."""
    if process:
        return run_magpie_process(*args, env=env, input=input, timeout=timeout, cwd=cwd)
    from magpie.cli.app import run

    full_env = dict(os.environ)
    full_env.update(env or {})
    stdin = _stream(input or "")
    stdout, stderr = _stream(), _stream()
    with _cwd(cwd):
        code = run(list(args), stdin=stdin, stdout=stdout, stderr=stderr, env=full_env)
    return subprocess.CompletedProcess(["magpie", *args], code, _text(stdout), _text(stderr))


def run_magpie_process(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m magpie ARGS`` in a subprocess with the test's environment (plus ``env``)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "magpie", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=timeout,
        cwd=cwd,
    )


def popen_magpie(
    *args: str, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "magpie", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        **kwargs,
    )


def _stream(text: str = "") -> io.TextIOWrapper:
    """A text stream over bytes, as a process's are (``.buffer`` for bytes)."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8", newline="")


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    raw = stream.buffer.getvalue()  # type: ignore[attr-defined]
    # As subprocess.run(text=True) reads it: universal newlines.
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def _cwd(cwd: str | Path | None) -> Iterator[None]:
    if cwd is None:
        yield
        return
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)
