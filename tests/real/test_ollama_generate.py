"""``magpie generate`` end to end on the real Ollama (the ``real`` tier)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from magpie_cli import popen_magpie, run_magpie
from real_servers import RealOllama

from .helpers import check_records, manifest, records

#: Token limits that keep a test short; the 20-record runs use magpie's defaults.
SHORT = ["--instruction-max-tokens", "128", "--response-max-tokens", "128", "--keep-truncated"]


def generate(srv: RealOllama, out: Path, *args: str, timeout: float = 1200):  # type: ignore[no-untyped-def]
    return run_magpie("generate", "--host", srv.url, "-o", str(out), *args, timeout=timeout)


def test_generate_20_records(ollama: RealOllama, tmp_path: Path):
    """The library SmolLM2 model (Ollama's template and SYSTEM), magpie's defaults."""
    out = tmp_path / "data.jsonl"
    started = time.monotonic()
    res = generate(ollama, out, "-n", "20", "--model", "smollm2", "--seed", "7")
    elapsed = time.monotonic() - started
    assert res.returncode == 0, res.stderr
    recs = check_records(out, 20)
    man = manifest(out)
    assert man["runs"][-1]["status"] == "done"
    # The pre-query is the server's own rendering of the model's template.
    assert man["template"]["source"] == "ollama-render", man["template"]
    assert all(r["template_source"] == "ollama-render" for r in recs)
    print(f"smollm2: 20 records in {elapsed:.0f} s; {res.stderr.splitlines()[-1]}")


def test_llama3_template_over_smollm2_weights(ollama: RealOllama, tmp_path: Path):
    """Ollama's Llama 3 template over SmolLM2 weights: the server renders the
    llama3 family, but the weights have no <|eot_id|> token, so the model never
    ends a user turn (it writes code or prose to the token limit, also in a
    bare request).  The run must say that the template does not fit, at the
    reject streak, rather than run forever or die on a retry."""
    out = tmp_path / "llama3.jsonl"
    res = generate(
        ollama,
        out,
        "-n",
        "5",
        "--model",
        "llama3-on-smollm2",
        "--seed",
        "7",
        "--instruction-max-tokens",
        "24",
        *SHORT[2:],
    )
    man = manifest(out)
    assert man["template"]["source"] == "ollama-render"
    assert man["template"]["name"] == "llama3"
    assert man["template"]["text"] == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert {"<|eot_id|>", "<|start_header_id|>"} <= set(man["template"]["stop"])
    if res.returncode == 0:  # the rare run where every attempt ended its turn
        check_records(out, 5)
        return
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "attempts were all rejected" in last and "--template" in last, last
    assert not man["runs"][-1]["retries"], man["runs"][-1]["retries"]


def test_top_up_sigint_sigkill_resume(ollama: RealOllama, tmp_path: Path):
    out = tmp_path / "data.jsonl"
    args = ["--model", "smollm2", "--seed", "11", *SHORT]
    res = generate(ollama, out, "-n", "3", *args)
    assert res.returncode == 0, res.stderr
    check_records(out, 3)
    # Top-up to 5.
    res = generate(ollama, out, "-n", "5", *args)
    assert res.returncode == 0, res.stderr
    check_records(out, 5)
    # SIGINT once a record more is written, then resume.
    for sig, code in ((signal.SIGINT, 130), (signal.SIGKILL, -9)):
        before = len(records(out))
        proc = popen_magpie("generate", "--host", ollama.url, "-o", str(out), "-n", "12", *args)
        deadline = time.monotonic() + 300
        while len(records(out)) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        assert proc.returncode == code
        n = len(records(out))
        assert before < n < 12
        check_records(out, n)
    res = generate(ollama, out, "-n", "12", *args)
    assert res.returncode == 0, res.stderr
    check_records(out, 12)
    statuses = [r["status"] for r in manifest(out)["runs"]]
    assert statuses[-1] == "done" and "interrupted" in statuses and "crashed" in statuses


def test_ollama_host_env_and_auto_backend(ollama: RealOllama, tmp_path: Path):
    """OLLAMA_HOST instead of --host; --backend auto with no --model picks
    llama3.1 when the server has it, and says why it does not otherwise."""
    env = {"OLLAMA_HOST": ollama.host}
    out = tmp_path / "env.jsonl"
    res = run_magpie("generate", "-o", str(out), "-n", "2", "--model", "smollm2", *SHORT, env=env)
    assert res.returncode == 0, res.stderr
    assert f"backend ollama: smollm2 at {ollama.url}" in res.stderr
    check_records(out, 2)
    # No llama3.1 on the server: the embedded default, and the line says why.
    res = run_magpie("generate", "-o", str(tmp_path / "e.jsonl"), "-n", "1", *SHORT, env=env)
    assert res.returncode == 0, res.stderr
    assert f"because Ollama at {ollama.url} has no llama3.1" in res.stderr
    assert "smollm2" in res.stderr.split("has no llama3.1", 1)[1].splitlines()[0]
    assert check_records(tmp_path / "e.jsonl", 1)[0]["backend"] == "embedded"
    # The weights under the name matter, not the name: llama3-on-smollm2 rarely
    # ends a user turn (see the test above), so the auto pick gets smollm2's.
    ollama.copy("smollm2", "llama3.1")
    out = tmp_path / "auto.jsonl"
    res = run_magpie("generate", "-o", str(out), "-n", "1", *SHORT, env=env)
    assert res.returncode == 0, res.stderr
    assert f"backend ollama: llama3.1:latest at {ollama.url} (Ollama is running)" in res.stderr
    rec = check_records(out, 1)[0]
    assert rec["backend"] == "ollama" and rec["model"] == "llama3.1:latest"
