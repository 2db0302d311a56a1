"""Helpers for the batch-job tests: a scripted Ollama server, reading outputs."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ollama_server import RENDER_VERSION, OllamaTestServer, ScriptedEngine, build_models
from ollama_server import _instruction as scripted_instruction

from magpie.records import SEED_SLOTS, Record
from magpie.store.manifest import Manifest, manifest_path

MODEL = "llama3.1:8b"
FAST_RETRY = ["--backoff-base", "0.05"]


@contextmanager
def scripted_server(latency: float = 0.0, slots: int | None = None) -> Iterator[OllamaTestServer]:
    engine = ScriptedEngine(latency=latency)
    with OllamaTestServer(build_models(["llama3.1"], engine), slots=slots) as srv:
        yield srv


def chatml_render(messages: list[dict[str, Any]], today: object = None) -> str:
    """A chat as Ollama renders it with SmolLM2's library template (ChatML), the
    generation prompt last (held to the real server's rendering by
    tests/real/test_ollama_protocol.py)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def rendering_server(slots: int | None = None) -> OllamaTestServer:
    """A scripted double that renders on request (``_debug_render_only``, as
    Ollama 0.11.5 and later do: the pre-query comes from it), serving
    ``smollm2:135m``."""
    models = build_models(["smollm2"], ScriptedEngine())
    for model in models:
        model.render = chatml_render
    return OllamaTestServer(models, slots=slots, version=RENDER_VERSION)


def gen_args(srv: OllamaTestServer, out: Path | str, n: int, *extra: str) -> list[str]:
    return [
        "generate",
        "-n",
        str(n),
        "--model",
        MODEL,
        "--host",
        srv.url,
        "-o",
        str(out),
        *FAST_RETRY,
        *extra,
    ]


def read_records(path: Path) -> list[Record]:
    """Every line must be a whole, valid record."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the file ends inside a line"
    return [Record.model_validate_json(line) for line in data.splitlines()]


def assert_exact(path: Path, n: int) -> list[Record]:
    recs = read_records(path)
    assert len(recs) == n
    assert len({r.id for r in recs}) == n, "duplicate ids"
    indexes = [r.index for r in recs]
    assert indexes == sorted(indexes) and len(set(indexes)) == n
    return recs


def manifest_of(path: Path) -> Manifest:
    return Manifest.model_validate_json(manifest_path(path).read_bytes())


def wait_for_lines(path: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines")


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def preference_engine():  # type: ignore[no-untyped-def]
    """Answers that vary with the seed; the judge scores them by their variant."""

    def text(source, options):  # type: ignore[no-untyped-def]
        seed = options.get("seed", 0)
        if isinstance(source, str):
            return scripted_instruction(seed // SEED_SLOTS)
        system = source[0]["content"] if source[0]["role"] == "system" else ""
        if "data-quality judge" not in system:
            return (
                f"Answer variant {seed % 5}: some helpful text about {source[-1]['content'][:20]}"
            )
        found = re.search(r"Answer variant (\d)", source[-1]["content"])
        score = 2 + 2 * int(found.group(1)) if found else 5
        return json.dumps(
            {
                "input_quality": "good",
                "input_quality_explanation": "ok",
                "difficulty": "easy",
                "intent": "i",
                "knowledge": "k",
                "task_category": "Creative writing",
                "other_categories": [],
                "safety": "safe",
                "safety_reason": "",
                "language": "en",
                "response_score": score,
                "response_reason": "r",
            }
        )

    return ScriptedEngine(text_fn=text)
