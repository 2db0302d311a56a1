"""The README's Python API example runs as written (against the Ollama test
server for its Ollama half, the real embedded model for the rest)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from batch_helpers import scripted_server

README = Path(__file__).resolve().parent.parent / "README.md"


def python_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_python_api_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    code = python_api_example()
    assert "from magpie import RunConfig, agenerate, generate" in code
    with scripted_server() as srv:
        env = {**os.environ, "OLLAMA_HOST": srv.url}
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stderr
    assert "10 written" in proc.stdout  # result.stats.summary()
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 10
    assert proc.stdout.count("index=") >= 3  # the low-level loop's items


def test_every_documented_llama_cpp_install_is_portable() -> None:
    """Each documented command that may compile llama.cpp (the embedded or test
    extra, llama-cpp-python itself) builds it portably, with the CMAKE_ARGS
    magpie's own messages give: a native build dies on machines that advertise
    AMX and reject it (issue 20, item 1)."""
    from magpie.backends.llamacpp.buildcheck import INSTALL_EMBEDDED, PORTABLE_CMAKE_ARGS

    portable = f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}"'
    root = README.parent
    installs = []
    for doc in ("README.md", "DEVELOPERS.md"):
        text = (root / doc).read_text()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "pip install" in line and re.search(
                    r"\[(embedded|test)\]|llama-cpp-python", line
                ):
                    installs.append(line)
                    assert portable in line, f"{doc}: {line}"
    assert len(installs) >= 3  # README's install, quick start and tests; DEVELOPERS' set-up
    ci = (root / ".ci" / "run").read_text()
    assert f"export {portable}" in ci
    assert portable in INSTALL_EMBEDDED
