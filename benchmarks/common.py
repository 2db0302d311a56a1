"""Shared helpers of the client-side benchmarks (client_overhead, pipeline_only,
memory, startup, multihost).

Servers run in their own process (they never share the client's GIL or CPU
accounting) and print their URL on stdout:

    python benchmarks/common.py scripted-server --latency 0.1 --slots 8
    python benchmarks/common.py instant-server --chunks one

* ``scripted-server``: ``tests/support/ollama_server.py`` (the project's Ollama-protocol
  test server, stdlib ThreadingHTTPServer) with a :class:`ScriptedEngine` that
  sleeps ``latency`` seconds per request, ``slots`` parallel generations (like
  ``OLLAMA_NUM_PARALLEL``), and streams one NDJSON line per word.  Its
  instructions are random pseudo-word sentences drawn from the request seed, so
  magpie's near-duplicate dedup rejects none of them (every attempt is a pair,
  as in the bare loop).
* ``instant-server``: a minimal asyncio HTTP/1.1 keep-alive server speaking just
  enough of the Ollama API (``/api/show``, ``/api/tags``, ``/api/version``,
  ``/api/generate``, ``/api/chat``, NDJSON streaming) to answer at once.
  ``--chunks one``: each reply is one content line plus the final ``done`` line;
  ``--chunks words``: one line per word, like Ollama's one line per token.

The bare baseline (:func:`bare_loop`) is what issue 5 compares magpie to: an
asyncio loop of K workers on one ``ollama.AsyncClient``, each issuing, per pair,
the raw ``/api/generate`` of the pre-query and then the ``/api/chat`` of the
instruction, streamed, with the same options magpie sends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "support"
FIXTURE = TESTS / "fixtures" / "ollama" / "llama3.1.json"
#: The model every benchmark server serves (an Ollama fixture: llama3 template).
MODEL = "llama3.1:8b"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------- text

_SYLLABLES = [
    a + b
    for a in ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
    for b in ("a", "e", "i", "o", "u", "ai", "ou", "ei")
]
_OPENERS = ("Explain", "Describe", "Compare", "Summarize", "Why do", "How can I use")


def instruction_text(seed: int) -> str:
    """A question of 10 random pseudo-words from ``seed``: distinct instructions
    (character 5-gram Jaccard near 0 between any two), so dedup rejects none."""
    h = hashlib.blake2b(str(seed).encode(), digest_size=40).digest()
    words = [
        _SYLLABLES[h[i] % len(_SYLLABLES)]
        + _SYLLABLES[h[i + 1] % len(_SYLLABLES)]
        + _SYLLABLES[h[i + 2] % len(_SYLLABLES)]
        for i in range(0, 30, 3)
    ]
    return f"{_OPENERS[h[30] % len(_OPENERS)]} {' '.join(words)}?"


ANSWER = (
    "Here is a clear and helpful reply. First, look at the main idea. Second, apply it "
    "step by step with a small example. Finally, check the result and adjust it if "
    "something does not fit. That is all there is to it, in short."
)


def _seed_of(options: Any) -> int:
    seed = options.get("seed") if isinstance(options, dict) else None
    return int(seed) if seed is not None else 0


def scripted_text(source: Any, options: Any) -> str:
    """``text_fn`` of the scripted server's ScriptedEngine."""
    if isinstance(source, str):  # raw generate: an instruction
        return instruction_text(_seed_of(options))
    return f"Answer {_seed_of(options) % 100000}: {ANSWER}"


# --------------------------------------------------------------------------- servers


def _serve_scripted(latency: float, slots: int | None, port: int, tuned: bool = True) -> None:
    sys.path.insert(0, str(TESTS))
    import ollama_server
    from ollama_server import OllamaTestServer, ScriptedEngine, load_fixture_model

    if tuned:
        tune_test_server(ollama_server)
    else:
        untune_test_server(ollama_server)
    engine = ScriptedEngine(latency=latency, text_fn=scripted_text)
    server = OllamaTestServer([load_fixture_model(FIXTURE, engine)], port=port, slots=slots)
    _serve_until_signal(server.start, server.stop, lambda: server.url)


def tune_test_server(module: Any) -> None:
    """Two socket settings of tests/support/ollama_server.py that distort client benchmarks.

    * Go's net/http (Ollama) sets TCP_NODELAY; the stdlib handler does not, and
      with Nagle on, each small NDJSON write after the first waits for the
      client's delayed ACK: measured 27% fewer pairs/s at latency 0.1 s, K=4.
    * socketserver listens with a backlog of 5: more than 5 clients connecting
      at once overflow it (SYNs dropped and retried after 1 s, some connections
      reset: httpx.ReadError).

    The test server now has TCP_NODELAY and a backlog of 128 itself; this
    raises the backlog to 1024 for the largest K.
    """
    module._Handler.disable_nagle_algorithm = True
    module._HTTPServer.request_queue_size = 1024


def untune_test_server(module: Any) -> None:
    """The stdlib's settings, as the test server had them before: Nagle on, backlog 5."""
    module._Handler.disable_nagle_algorithm = False
    module._HTTPServer.request_queue_size = 5


def _serve_until_signal(
    start: Callable[[], Any], stop: Callable[[], Any], url: Callable[[], str]
) -> None:
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    start()
    print(url(), flush=True)
    while not done.wait(0.5):
        pass
    stop()


_CL_RE = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_SEED_RE = re.compile(rb'"seed":\s*(-?\d+)')


class _InstantProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, requests answered in full as soon as they are read."""

    def __init__(self, app: _InstantApp) -> None:
        self.app = app
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = _CL_RE.search(head)
            n = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + n:
                return
            body = self.buf[end + 4 : end + 4 + n]
            self.buf = self.buf[end + 4 + n :]
            method, path = head.split(b" ", 2)[:2]
            assert self.transport is not None
            self.transport.write(self.app.handle(method, path.split(b"?", 1)[0], body))


class _InstantApp:
    def __init__(self, chunks: str) -> None:
        data = json.loads(FIXTURE.read_text("utf-8"))
        self.chunks = chunks
        self.show = self._json(200, data["show"])
        tags = {**data["tags"], "name": MODEL, "model": MODEL}
        self.tags = self._json(200, {"models": [tags]})
        self.version = self._json(200, {"version": "0.6.0-instant"})
        self.not_found = self._json(404, {"error": "not found"})
        self.requests = 0

    @staticmethod
    def _json(status: int, payload: Any) -> bytes:
        body = json.dumps(payload).encode()
        reason = {200: "OK", 404: "Not Found"}[status]
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def _stream(self, chat: bool, text: str) -> bytes:
        pieces = re.findall(r"\s*\S+", text) if self.chunks == "words" else [text]
        head = f'{{"model":"{MODEL}","created_at":"2025-01-01T00:00:00Z",'
        lines = []
        for piece in pieces:
            content = json.dumps(piece)
            if chat:
                lines.append(
                    f'{head}"message":{{"role":"assistant","content":{content}}},"done":false}}\n'
                )
            else:
                lines.append(f'{head}"response":{content},"done":false}}\n')
        empty = '"message":{"role":"assistant","content":""}' if chat else '"response":""'
        lines.append(
            f'{head}{empty},"done":true,"done_reason":"stop","total_duration":1000,'
            f'"load_duration":0,"prompt_eval_count":12,"prompt_eval_duration":10,'
            f'"eval_count":{len(pieces)},"eval_duration":100}}\n'
        )
        out = [
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        ]
        for line in lines:
            data = line.encode()
            out.append(b"%x\r\n%s\r\n" % (len(data), data))
        out.append(b"0\r\n\r\n")
        return b"".join(out)

    def handle(self, method: bytes, path: bytes, body: bytes) -> bytes:
        self.requests += 1
        if path == b"/api/generate" or path == b"/api/chat":
            m = _SEED_RE.search(body)
            seed = int(m.group(1)) if m else self.requests
            if path == b"/api/generate":
                return self._stream(False, instruction_text(seed))
            return self._stream(True, f"Answer {seed % 100000}: {ANSWER}")
        if path == b"/api/show":
            return self.show
        if path == b"/api/tags":
            return self.tags
        if path == b"/api/version":
            return self.version
        return self.not_found


def _serve_instant(port: int, chunks: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        app = _InstantApp(chunks)
        server = await loop.create_server(
            lambda: _InstantProtocol(app), "127.0.0.1", port, backlog=1024
        )
        real_port = server.sockets[0].getsockname()[1]
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        print(f"http://127.0.0.1:{real_port}", flush=True)
        await done.wait()
        server.close()

    asyncio.run(main())


@dataclass
class ServerProcess:
    """A benchmark server in its own process (see the module docstring)."""

    proc: subprocess.Popen[str]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def server_process(kind: str, *args: str) -> Iterator[ServerProcess]:
    """Start ``python benchmarks/common.py KIND ARGS`` and yield it once it listens."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError(f"{kind} did not start (printed {url!r})")
    server = ServerProcess(proc, url)
    try:
        yield server
    finally:
        server.stop()


def scripted_server(
    latency: float, slots: int | None, *, tuned: bool = True
) -> contextlib.AbstractContextManager[Any]:
    args = ["--latency", str(latency)]
    if slots:
        args += ["--slots", str(slots)]
    if not tuned:
        args.append("--untuned")
    return server_process("scripted-server", *args)


def instant_server(chunks: str = "one") -> contextlib.AbstractContextManager[Any]:
    return server_process("instant-server", "--chunks", chunks)


# --------------------------------------------------------------------------- clients


@dataclass
class Measure:
    """One timed run in this process."""

    label: str
    pairs: int
    seconds: float
    cpu: float  # client process CPU seconds (user + system, all threads)
    server_cpu: float = 0.0
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def cpu_ms_per_pair(self) -> float:
        return 1000 * self.cpu / max(1, self.pairs)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def pre_query_of(url: str) -> tuple[str, list[str]]:
    """The pre-query text and stop strings magpie resolves for the served model."""
    from magpie.commands.generate import prepare
    from magpie.settings import RunConfig

    prep = await prepare(RunConfig(backend="ollama", model=MODEL, host=url))
    await prep.backend.aclose()
    return prep.pre_query.text, list(prep.pre_query.stop)


async def bare_loop(
    url: str,
    pairs: int,
    concurrency: int,
    *,
    seed: int = 1,
    server: ServerProcess | None = None,
    label: str = "bare asyncio loop",
) -> Measure:
    """K workers on one ``ollama.AsyncClient``: per pair a streamed raw
    ``/api/generate`` of the pre-query, then a streamed ``/api/chat`` of the
    instruction, with the options magpie sends (sampling defaults, seed, stop)."""
    import ollama

    pre_query, stop = await pre_query_of(url)
    client = ollama.AsyncClient(host=url, timeout=300.0)
    counter = iter(range(pairs))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in counter:
            inst_opts = {
                "temperature": 1.0,
                "top_p": 1.0,
                "num_predict": 512,
                "top_k": 0,
                "repeat_penalty": 1.0,
                "seed": seed * 1_000_003 + 2 * i,
                "stop": stop,
            }
            text = ""
            async for chunk in await client.generate(
                model=MODEL, prompt=pre_query, raw=True, options=inst_opts, stream=True
            ):
                text += chunk.response or ""
            resp_opts = {
                "temperature": 0.0,
                "top_p": 1.0,
                "num_predict": 2048,
                "top_k": 0,
                "repeat_penalty": 1.0,
                "seed": seed * 1_000_003 + 2 * i + 1,
            }
            answer = ""
            async for chunk in await client.chat(
                model=MODEL,
                messages=[{"role": "user", "content": text.strip()}],
                options=resp_opts,
                stream=True,
            ):
                answer += chunk.message.content or ""
            assert answer
            done += 1

    server_cpu0 = server.cpu_seconds() if server else 0.0
    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    server_cpu = (server.cpu_seconds() - server_cpu0) if server else 0.0
    await client.close()
    return Measure(label, done, seconds, cpu, server_cpu, attempts=done)


async def magpie_run(
    url: str | list[str],
    pairs: int,
    concurrency: int,
    *,
    dedup: bool = True,
    seed: int = 1,
    server: ServerProcess | None = None,
    label: str | None = None,
    output: Path | None = None,
    hooks: dict[str, Any] | None = None,
    null_backend: bool = False,
    official_client: bool = False,
    **config: Any,
) -> Measure:
    """``magpie.commands.generate.agenerate(RunConfig(...))`` to a fresh temporary file:
    the whole path (pipeline, dedup, writer, manifest), as ``magpie generate``.

    Seconds and CPU cover the whole call (backend probe, template, manifest,
    dedup cache saved at the end).  ``hooks`` go to ``agenerate`` (``on_start``,
    ``on_result``, ``control``); the RunResult is in ``extra["result"]``.
    ``official_client``: /api/generate and /api/chat through ``ollama.AsyncClient``
    (httpx's default transport) instead of magpie's direct NDJSON path over aiohttp."""
    from magpie.commands.generate import agenerate
    from magpie.settings import RunConfig

    with tempfile.TemporaryDirectory(prefix="magpie-bench-") as tmp:
        out = output or Path(tmp) / "out.jsonl"
        cfg = RunConfig(
            num=pairs,
            output=str(out),
            overwrite=True,
            backend="ollama",
            model=MODEL,
            host=url,
            concurrency=concurrency,
            seed=seed,
            dedup=dedup,
            quiet=True,
            **config,
        )
        hooks = dict(hooks or {})
        if null_backend:
            assert isinstance(url, str)
            hooks["prepared"] = await null_prepared(url)
        elif official_client:
            assert isinstance(url, str)
            hooks["prepared"] = await official_prepared(url, config.get("timeout", 300.0))
        server_cpu0 = server.cpu_seconds() if server else 0.0
        cpu0, t0 = _cpu(), time.perf_counter()
        result = await agenerate(cfg, **hooks)
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
        server_cpu = (server.cpu_seconds() - server_cpu0) if server else 0.0
    stats = result.stats
    name = label or (
        f"magpie agenerate (dedup {'on' if dedup else 'off'})"
        + (", null backend (no HTTP)" if null_backend else "")
        + (", ollama.AsyncClient for generate/chat" if official_client else "")
    )
    return Measure(
        name,
        stats.written,
        seconds,
        cpu,
        server_cpu,
        attempts=stats.attempts,
        extra={
            "rejected": dict(stats.rejected),
            "retries": dict(stats.retries),
            "result": result,
        },
    )


async def official_prepared(url: str, timeout: float = 300.0) -> Any:
    """A :class:`magpie.commands.generate.Prepared` whose Ollama backend sends /api/generate
    and /api/chat through ``ollama.AsyncClient`` (``direct_stream=False``)."""
    from magpie.backends.ollama import OllamaBackend
    from magpie.commands.generate import prepare
    from magpie.settings import RunConfig

    prep = await prepare(RunConfig(backend="ollama", model=MODEL, host=url))
    await prep.backend.aclose()
    prep.backend = OllamaBackend(MODEL, url, timeout=timeout, direct_stream=False)
    return prep


async def null_prepared(url: str) -> Any:
    """A :class:`magpie.commands.generate.Prepared` whose backend answers in memory (no
    HTTP), with the model description and pre-query of the server at ``url``."""
    from magpie.backends.base import Backend, Completion
    from magpie.commands.generate import Prepared, prepare
    from magpie.settings import RunConfig

    real = await prepare(RunConfig(backend="ollama", model=MODEL, host=url))
    await real.backend.aclose()

    class NullBackend(Backend):
        """Answers at once: what magpie costs with a free server and free HTTP."""

        name = "ollama"

        @property
        def model(self) -> str:
            return MODEL

        @property
        def host(self) -> str:
            return url

        async def complete(self, prompt: str, *, seed: int | None = None, **_: Any) -> Completion:
            await asyncio.sleep(0)  # one suspension, as a real request has (several)
            text = instruction_text(seed or 0)
            return Completion(
                text=text, finish_reason="stop", prompt_tokens=12, completion_tokens=11
            )

        async def chat(self, messages: Any, *, seed: int | None = None, **_: Any) -> Completion:
            await asyncio.sleep(0)
            text = f"Answer {(seed or 0) % 100000}: {ANSWER}"
            return Completion(
                text=text, finish_reason="stop", prompt_tokens=20, completion_tokens=45
            )

        async def describe(self) -> Any:
            return real.info

    return Prepared(NullBackend(), real.info, real.pre_query, "null backend")


# --------------------------------------------------------------------------- output


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load} at start"
    )


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    align = ["---:" if rows and isinstance(r, int | float) else "---" for r in rows[0]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(checks: list[tuple[str, bool]]) -> int:
    """Print each target as met or MISSED; the exit status (1 if any missed)."""
    print()
    for name, ok in checks:
        print(f"- {'met' if ok else 'MISSED'}: {name}")
    missed = [name for name, ok in checks if not ok]
    if missed:
        print(f"\nMISSED {len(missed)} target(s)")
        return 1
    print("\nall targets met")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scripted-server")
    s.add_argument("--latency", type=float, default=0.1)
    s.add_argument("--slots", type=int, default=None)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--untuned", action="store_true", help="the stdlib's Nagle on and backlog of 5")
    i = sub.add_parser("instant-server")
    i.add_argument("--chunks", choices=("one", "words"), default="one")
    i.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "scripted-server":
        _serve_scripted(args.latency, args.slots, args.port, tuned=not args.untuned)
    else:
        _serve_instant(args.port, args.chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
