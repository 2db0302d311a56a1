"""Run the real ``magpie`` command in a subprocess (real exit codes, real streams)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_magpie(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 600,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m magpie ARGS`` with the test's environment (plus ``env``)."""
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
