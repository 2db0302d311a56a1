"""The CLI in process (``typer.testing.CliRunner``): each option reaches its
setting, help and usage errors, ``doctor`` and ``generate`` against the test
doubles.  No model is loaded here; the subprocess tests (tests/support/magpie_cli.py)
keep the real command's streams and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import MODEL, assert_exact, gen_args, manifest_of, scripted_server
from ollama_server import ScriptedEngine
from openai_server import OpenAITestServer, ServedModel
from typer.testing import CliRunner

from magpie.cli import generate as cli_generate
from magpie.cli.app import app, main
from magpie.errors import ExitStatus
from magpie.settings import RunConfig, build_config, setting_path

#: Options of a command that are no setting: how it reads them, not what it makes.
COMMAND_ONLY = {
    "generate": {"config", "log_file", "log_format", "debug"},
    "filter": {"input", "config", "debug"},
    "doctor": {"config", "as_json", "debug"},
}

GENERATE_OPTIONS = [
    "--num",
    "--output",
    "--overwrite",
    "--allow-mixed",
    "--backend",
    "--model",
    "--host",
    "--template",
    "--system",
    "--seed",
    "--concurrency",
    "--instruction-temperature",
    "--instruction-top-p",
    "--instruction-min-p",
    "--instruction-max-tokens",
    "--response-temperature",
    "--response-top-p",
    "--response-min-p",
    "--response-max-tokens",
    "--keep-truncated",
    "--reasoning",
    "--timeout",
    "--max-retries",
    "--unreachable-budget",
    "--backoff-base",
    "--grace-period",
    "--language",
    "--judge",
    "--judge-backend",
    "--judge-host",
    "--judge-prompt",
    "--prejudge",
    "--min-quality",
    "--min-difficulty",
    "--min-response-score",
    "--categories",
    "--guard",
    "--drop-unsafe",
    "--rejects",
    "--shard",
    "--num-ctx",
    "--turns",
    "--responses",
    "--samples-per-request",
    "--system-preset",
    "--balance",
    "--personas",
    "--persona-template",
    "--topics",
    "--topic-template",
    "--no-dedup",
    "--dedup-threshold",
    "--semantic-model",
    "--semantic-threshold",
    "--semantic-backend",
    "--semantic-host",
    "--config",
    "--log-file",
    "--log-format",
    "--quiet",
    "--debug",
]


def command(name: str) -> Any:
    import typer

    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def test_generate_help_lists_every_option() -> None:
    result = CliRunner().invoke(app, ["generate", "--help"])
    assert result.exit_code == 0, result.output
    for option in GENERATE_OPTIONS:
        assert option in result.stdout, option
    declared = {opt for p in command("generate").params for opt in p.opts if opt.startswith("--")}
    assert declared == set(GENERATE_OPTIONS)


@pytest.mark.parametrize("name", sorted(COMMAND_ONLY))
def test_every_option_is_a_setting_by_its_name(name: str) -> None:
    """A parameter named after no setting would be dropped without a word:
    each is a setting (flat, or ``instruction_temperature`` style) or command-only."""
    for param in command(name).params:
        if param.name in COMMAND_ONLY[name]:
            continue
        assert setting_path(param.name) is not None, (name, param.name, param.opts)


def captured_flags(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[dict[str, Any], Any]:
    """The settings ``magpie generate ARGS`` hands on, and its config file."""
    seen: dict[str, Any] = {}

    def fake(flags: dict[str, Any], config_file: Path | None, reporter: Any, debug: bool) -> int:
        seen.update(flags=flags, config_file=config_file)
        return ExitStatus.OK

    monkeypatch.setattr(cli_generate, "_generate", fake)
    result = CliRunner().invoke(app, ["generate", *args])
    assert result.exit_code == 0, result.output
    return seen["flags"], seen["config_file"]


def test_each_option_reaches_its_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flags, _ = captured_flags(
        monkeypatch,
        *("-n", "5", "-o", "out.jsonl", "--overwrite", "--host", "http://a:1"),
        *("--host", "http://b:2", "-c", "3", "--instruction-temperature", "0.5"),
        *("--response-max-tokens", "64", "--language", "en", "--no-dedup"),
        *("--categories", "math,coding & debugging", "--judge", "j", "--judge-prompt", "p.txt"),
        *("--judge-host", "http://j:3", "--min-quality", "good", "--reasoning", "drop", "-q"),
    )
    cfg = build_config(flags, environ={})
    assert (cfg.num, cfg.output, cfg.overwrite, cfg.concurrency) == (5, "out.jsonl", True, 3)
    assert cfg.host == ["http://a:1", "http://b:2"]
    assert cfg.instruction.temperature == 0.5 and cfg.instruction.max_tokens == 512
    assert cfg.response.max_tokens == 64 and cfg.filters.language == "en"
    assert cfg.dedup is False and cfg.categories == ["Math", "Coding & Debugging"]
    assert (cfg.judge, cfg.judge_prompt, cfg.judge_host) == ("j", "p.txt", "http://j:3")
    assert (cfg.min_quality, cfg.reasoning, cfg.quiet) == ("good", "drop", True)


def test_options_not_given_leave_the_file_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Defaults < config file < environment < flags: an option not given is
    not a flag (its default would hide the file's value)."""
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("num = 7\nseed = 3\ndedup = false\n[instruction]\ntop_p = 0.9\n")
    flags, config_file = captured_flags(monkeypatch, "--config", str(cfg_file), "--seed", "4")
    assert flags == {"seed": 4}
    cfg = build_config(flags, config_file=config_file, environ={"MAGPIE_NUM": "8"})
    assert (cfg.num, cfg.seed, cfg.dedup, cfg.instruction.top_p) == (8, 4, False, 0.9)
    assert cfg.quiet is False and cfg.template == RunConfig().template


def test_empty_categories_leave_the_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('categories = ["Math"]\n')
    flags, config_file = captured_flags(monkeypatch, "--config", str(cfg_file), "--categories", "")
    assert build_config(flags, config_file=config_file, environ={}).categories == ["Math"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--bogus-flag"], "--bogus-flag"),
        (["generate", "-n", "many"], "--num"),
        (["doctor", "--json", "extra"], "extra"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    captured = capsys.readouterr()
    assert exit_.value.code == ExitStatus.USAGE
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("magpie: error: "), captured.err
    assert needle in lines[0]


def test_bad_setting_value_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--categories", "Cooking", "-o", "x.jsonl"])
    assert result.exit_code == ExitStatus.USAGE
    assert result.stderr.strip().splitlines() == [
        next(ln for ln in result.stderr.splitlines() if ln.startswith("magpie: error: "))
    ]
    assert "unknown category 'Cooking'" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_doctor_openai_against_the_double() -> None:
    served = ServedModel(id="smol", engine=ScriptedEngine())
    with OpenAITestServer([served], flavor="vllm") as srv:
        result = CliRunner().invoke(
            app,
            ["doctor", "--backend", "openai", "--host", srv.url, "-t", "chatml", "--json"],
        )
    assert result.exit_code == 0, result.output
    checks = json.loads(result.stdout)
    assert [c["name"] for c in checks] == [
        "backend",
        "reachable",
        "model",
        "template",
        "smoke test",
    ]
    assert all(c["ok"] for c in checks), checks
    assert "backend openai: the first model served at " + srv.url in checks[0]["detail"]


def test_doctor_openai_server_down_exit_3() -> None:
    from conftest import CLOSED_PORT

    url = f"http://127.0.0.1:{CLOSED_PORT}"
    result = CliRunner().invoke(app, ["doctor", "--backend", "openai", "--host", url, "--json"])
    assert result.exit_code == ExitStatus.BACKEND_UNAVAILABLE
    checks = json.loads(result.stdout)
    assert checks[1]["name"] == "reachable" and not checks[1]["ok"]


def test_generate_against_the_ollama_double(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with scripted_server() as srv:
        first = CliRunner().invoke(app, gen_args(srv, out, 3, "--seed", "9", "-c", "2"))
        assert first.exit_code == 0, first.output
        assert "backend ollama" in first.stderr
        assert manifest_of(out).settings["concurrency"] == 2
        again = CliRunner().invoke(app, gen_args(srv, out, 5))
    assert again.exit_code == 0, again.output
    assert "holds 3 records; generating 2 more" in again.stderr
    recs = assert_exact(out, 5)
    assert {r.model for r in recs} == {MODEL} and {r.seed for r in recs} == {9}
    manifest = manifest_of(out)
    assert manifest.seed == 9 and len(manifest.runs) == 2
    assert manifest.settings["concurrency"] == 4  # auto: the Ollama backend's own


def test_persona_and_topic_lists_are_read_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The checks load the lists; the run goes on with them (no second read)."""
    import magpie.settings.model as model

    reads: list[tuple[str, str]] = []
    real = model.load_list

    def counted(spec: str, kind: str) -> Any:
        reads.append((spec, kind))
        return real(spec, kind)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "load_list", counted)
    personas = tmp_path / "personas.txt"
    personas.write_text("a chef in Lyon\na pilot\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with scripted_server() as srv:
        args = gen_args(srv, out, 4, "--personas", str(personas), "--topics", "general")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(reads) == [(str(personas), "persona"), ("general", "topic")]
    recs = assert_exact(out, 4)
    assert {r.persona for r in recs} <= {"a chef in Lyon", "a pilot"}
    assert all(r.topic for r in recs)


def test_run_in_process_gives_the_status_and_streams_and_puts_everything_back(
    tmp_path: Path,
) -> None:
    """``magpie.cli.app.run``: the command in this process with injected
    streams and environment; afterwards the process's own are as they were."""
    import io
    import os
    import signal
    import sys

    from magpie.cli.app import run

    before = (sys.stdin, sys.stdout, sys.stderr, dict(os.environ))
    handler = signal.getsignal(signal.SIGTERM)
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    data = tmp_path / "d.jsonl"
    data.write_text("")
    env = {**os.environ, "MAGPIE_NUM": "0"}
    assert run(["stats", str(data), "--json"], stdout=out, stderr=err, env=env) == 0
    out.flush()
    assert json.loads(out.buffer.getvalue())["kept"] == 0  # type: ignore[attr-defined]
    assert run(["generate", "--no-such-flag"], stdout=out, stderr=err) == 2
    err.flush()
    assert "magpie: error: No such option: --no-such-flag" in err.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert (sys.stdin, sys.stdout, sys.stderr, dict(os.environ)) == before
    assert signal.getsignal(signal.SIGTERM) is handler
