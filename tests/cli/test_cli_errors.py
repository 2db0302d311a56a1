"""Bad input and unreachable backends through the real CLI: one clear line on
stderr, the documented exit code, nothing on stdout, no file written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from magpie_cli import run_magpie

from conftest import CLOSED_PORT

USAGE, UNAVAILABLE = 2, 3


def assert_one_line_error(proc, code: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_ollama_down_names_host_and_ollama_serve(tmp_path: Path) -> None:
    proc = run_magpie("generate", "-n", "2", "--backend", "ollama", "-o", "out.jsonl")
    assert_one_line_error(proc, UNAVAILABLE, f"127.0.0.1:{CLOSED_PORT}", "ollama serve")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_model_name_given_and_ollama_down(tmp_path: Path) -> None:
    proc = run_magpie("generate", "-n", "1", "--model", "llama3.1:8b")
    assert_one_line_error(proc, UNAVAILABLE, "ollama serve")


def test_debug_shows_traceback() -> None:
    proc = run_magpie("generate", "-n", "1", "--backend", "ollama", "--debug")
    assert proc.returncode == UNAVAILABLE
    assert "Traceback" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-n", "0"], "num"),
        (["-n", "-3"], "num"),
        (["-n", "many"], "--num"),
        (["--instruction-temperature", "9"], "instruction.temperature"),
        (["--instruction-top-p", "0"], "instruction.top_p"),
        (["--response-top-p", "1.5"], "response.top_p"),
        (["--response-max-tokens", "0"], "response.max_tokens"),
        (["--instruction-max-tokens", "-1"], "instruction.max_tokens"),
        (["--backend", "vllm"], "backend"),
        (["--template", "nope"], "known families"),
        (["--host", "not a url"], "not a URL"),
        (["--host", "ftp://x"], "not a URL"),
        (["--concurrency", "0"], "concurrency"),
        (["--model", "missing.gguf"], "not found"),
        (["--bogus-flag"], "bogus"),
        (["-n", "1000000000000"], "num"),
        (["--response-max-tokens", "99999999"], "response.max_tokens"),
        (["--model", ""], "model"),
        (["--language", "xx"], "--language 'xx'"),
        (["--instruction-temperature", "nan"], "instruction.temperature"),
        (["--judge-backend", "ollama"], "needs --judge"),
        (["--host", "http://127.0.0.1:11434/api"], "base URL"),
    ],
)
def test_bad_flags_exit_2(args: list[str], needle: str) -> None:
    proc = (
        run_magpie("generate", "--backend", "embedded", *args, "-o", "out.jsonl")
        if args[0] != "--backend"
        else run_magpie("generate", *args, "-o", "out.jsonl")
    )
    assert_one_line_error(proc, USAGE, needle)
    assert not Path("out.jsonl").exists()


def test_non_gguf_model_file(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_text("this is not a model")
    proc = run_magpie("generate", "-n", "1", "--model", str(f))
    assert_one_line_error(proc, USAGE, "not a GGUF")


def test_output_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    proc = run_magpie("generate", "-n", "1", "--backend", "embedded", "-o", "d")
    assert_one_line_error(proc, USAGE, "is a directory")


def test_output_directory_missing() -> None:
    proc = run_magpie("generate", "-n", "1", "--backend", "embedded", "-o", "no/such/dir/x.jsonl")
    assert_one_line_error(proc, USAGE, "does not exist")


def test_output_that_is_not_magpie_jsonl_is_untouched(tmp_path: Path) -> None:
    other = tmp_path / "package.json"
    content = json.dumps({"name": "x", "version": "1"}, indent=2) + "\n"
    other.write_text(content)
    proc = run_magpie("generate", "-n", "1", "--backend", "embedded", "-o", str(other))
    assert_one_line_error(proc, USAGE, "not a magpie JSONL", "--overwrite")
    assert other.read_text() == content


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("c.toml", "num = [", "not valid TOML"),
        ("c.yaml", "num: [1,", "not valid YAML"),
        ("c.toml", "colour = 1\n", "unknown setting 'colour'"),
        ("c.toml", "[response]\ntemperature = -1\n", "response.temperature"),
    ],
)
def test_bad_config_file(tmp_path: Path, name: str, text: str, needle: str) -> None:
    (tmp_path / name).write_text(text)
    proc = run_magpie("generate", "--config", name)
    assert_one_line_error(proc, USAGE, needle)


def test_missing_config_file() -> None:
    proc = run_magpie("generate", "--config", "nope.toml")
    assert_one_line_error(proc, USAGE, "not found")


def test_env_value_is_validated() -> None:
    proc = run_magpie("generate", env={"MAGPIE_NUM": "zero"})
    assert_one_line_error(proc, USAGE, "num", "environment")


def test_templates_show_unknown() -> None:
    proc = run_magpie("templates", "show", "nope")
    assert_one_line_error(proc, USAGE, "known families")


def test_export_missing_input() -> None:
    proc = run_magpie("export", "nope.jsonl", "--format", "openai")
    assert_one_line_error(proc, USAGE, "not found")


def test_help_shows_no_python_types() -> None:
    proc = run_magpie("generate", "--help")
    assert proc.returncode == 0 and "--host <url>" in proc.stdout
    assert "list[" not in proc.stdout


def test_help_and_version() -> None:
    proc = run_magpie("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout and "export" in proc.stdout
    proc = run_magpie("generate", "--help")
    for flag in (
        "--num",
        "--output",
        "--backend",
        "--model",
        "--host",
        "--template",
        "--system",
        "--seed",
        "--instruction-temperature",
        "--response-max-tokens",
        "--config",
        "--quiet",
        "--debug",
    ):
        assert flag in proc.stdout
    proc = run_magpie("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("magpie ")


def test_unwritable_output_directory() -> None:
    # /sys refuses new files even to root (os.access would say yes).
    proc = run_magpie("generate", "-n", "1", "--backend", "embedded", "-o", "/sys/magpie.jsonl")
    assert_one_line_error(proc, USAGE, "not writable")


def test_bad_input_is_reported_before_contacting_the_backend() -> None:
    """Ollama is down here, yet a bad template is a usage error (exit 2), not exit 3."""
    proc = run_magpie("generate", "--backend", "ollama", "--template", "nope", "-o", "x.jsonl")
    assert_one_line_error(proc, USAGE, "known families")
    proc = run_magpie("generate", "--backend", "ollama", "--template", "gemma", "--system", "x")
    assert (
        proc.returncode == 3
    )  # gemma has a system slot: the request goes on, and fails on the server
    proc = run_magpie("generate", "--backend", "ollama", "--log-file", "/sys/x.log")
    assert_one_line_error(proc, USAGE, "cannot open log file")


def test_family_without_system_slot_rejects_system(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text('pre_query = "Q: "\nstop = ["A:"]\n')
    proc = run_magpie("generate", "--backend", "ollama", "--template", "t.toml", "--system", "hi")
    assert_one_line_error(proc, USAGE, "no system slot")
