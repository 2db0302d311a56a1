"""Configuration: precedence, file formats, validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from magpie.errors import UsageError
from magpie.settings import build_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults() -> None:
    cfg = build_config({}, environ={})
    assert cfg.num == 100 and cfg.output == "-" and cfg.backend == "auto"
    assert cfg.template == "auto"
    assert (cfg.instruction.temperature, cfg.instruction.top_p) == (1.0, 1.0)
    assert cfg.response.temperature == 0.0
    assert cfg.instruction.max_tokens > 0 and cfg.response.max_tokens > 0


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "run.toml",
        'num = 7\nmodel = "from-file"\nseed = 1\nhost = "http://file:1"\n'
        "[instruction]\ntemperature = 0.5\nmax_tokens = 99\n",
    )
    env = {"MAGPIE_MODEL": "from-env", "MAGPIE_SEED": "2", "MAGPIE_INSTRUCTION_TEMPERATURE": "0.7"}
    cfg = build_config({"seed": 3}, config_file=f, environ=env)
    assert cfg.num == 7  # file over default
    assert cfg.model == "from-env"  # env over file
    assert cfg.seed == 3  # flag over env
    assert cfg.instruction.temperature == 0.7  # env over file, nested
    assert cfg.instruction.max_tokens == 99  # file, nested; the rest keep defaults
    assert cfg.instruction.top_p == 1.0
    assert cfg.host == "http://file:1"


def test_ollama_host_env_and_magpie_host(tmp_path: Path) -> None:
    assert build_config({}, environ={"OLLAMA_HOST": "http://a:1"}).host == "http://a:1"
    env = {"OLLAMA_HOST": "http://a:1", "MAGPIE_HOST": "http://b:2"}
    assert build_config({}, environ=env).host == "http://b:2"
    assert build_config({"host": "http://c:3"}, environ=env).host == "http://c:3"


def test_yaml_config(tmp_path: Path) -> None:
    f = write(tmp_path, "run.yaml", "num: 12\nbackend: embedded\nresponse:\n  max_tokens: 64\n")
    cfg = build_config({}, config_file=f, environ={})
    assert (cfg.num, cfg.backend, cfg.response.max_tokens) == (12, "embedded", 64)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.toml", "num = \n", "not valid TOML"),
        ("bad.yaml", "num: [1,\n", "not valid YAML"),
        ("list.yaml", "- 1\n- 2\n", "must hold a table"),
        ("unknown.toml", "numm = 3\n", "unknown setting 'numm'"),
        (
            "nested.toml",
            "[instruction]\ntemprature = 1\n",
            "unknown setting 'instruction.temprature'",
        ),
        ("range.toml", "[response]\ntemperature = 9\n", "response.temperature"),
        ("neg.toml", "num = -1\n", "num"),
        ("type.toml", 'num = "many"\n', "num"),
        ("backend.toml", 'backend = "vllm"\n', "backend"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, name: str, text: str, match: str) -> None:
    f = write(tmp_path, name, text)
    with pytest.raises(UsageError, match=match) as exc:
        build_config({}, config_file=f, environ={})
    assert "\n" not in str(exc.value)


def test_error_says_where_the_value_came_from(tmp_path: Path) -> None:
    f = write(tmp_path, "r.toml", "[instruction]\ntop_p = 2.0\n")
    with pytest.raises(UsageError, match=r"instruction.top_p \(from config file"):
        build_config({}, config_file=f, environ={})
    with pytest.raises(UsageError, match=r"num \(from environment\)"):
        build_config({}, environ={"MAGPIE_NUM": "0"})
    with pytest.raises(UsageError, match=r"num \(from command line\)"):
        build_config({"num": 0}, environ={})


def test_missing_and_directory_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        build_config({}, config_file=tmp_path / "nope.toml", environ={})
    with pytest.raises(UsageError, match="directory"):
        build_config({}, config_file=tmp_path, environ={})


def test_shipped_example_configs_are_valid() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    files = sorted([*configs.glob("*.toml"), *configs.glob("*.yaml")])
    assert files, "configs/ holds example run configs"
    for f in files:
        build_config({}, config_file=f, environ={})


def test_host_credentials_are_sent_and_api_paths_refused(tmp_path: Path) -> None:
    import base64

    from batch_helpers import gen_args, scripted_server
    from magpie_cli import run_magpie

    with scripted_server() as srv:
        authed = srv.url.replace("http://", "http://bob:s%40cret@")
        out = tmp_path / "d.jsonl"
        args = gen_args(srv, out, 2, "--seed", "1")
        args[args.index(srv.url)] = authed
        proc = run_magpie(*args)
        seen = {
            r.headers.get("authorization") or r.headers.get("Authorization") for r in srv.requests
        }
    assert proc.returncode == 0, proc.stderr
    assert seen == {"Basic " + base64.b64encode(b"bob:s@cret").decode()}
    assert "bob" not in out.read_text() and "cret" not in out.read_text()
    proc = run_magpie("generate", "-n", "1", "--host", "http://127.0.0.1:9/api", "--model", "m")
    assert proc.returncode == 2 and "give the server's base URL" in proc.stderr


def test_config_file_json_and_bad_values(tmp_path: Path) -> None:
    from magpie.settings import RunConfig, load_config_file

    cfg = tmp_path / "c.json"
    cfg.write_text('{"num": 3, "model": "llama3.1:8b"}')
    assert load_config_file(cfg) == {"num": 3, "model": "llama3.1:8b"}
    cfg.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_config_file(cfg)
    for bad in ({"num": 10**12}, {"model": ""}, {"timeout": float("nan")}):
        with pytest.raises(ValueError):
            RunConfig(**bad)


def test_every_backend_name_has_its_traits() -> None:
    from typing import get_args

    from magpie.backends.spec import BackendName
    from magpie.settings import BACKENDS

    assert set(BACKENDS) == set(get_args(BackendName))


def test_pipeline_settings_are_derived_from_run_config() -> None:
    from magpie.pipeline.scheduler import PipelineSettings
    from magpie.settings import RunConfig

    cfg = RunConfig(
        turns=3,
        keep_truncated=True,
        reasoning="drop",
        prejudge=True,
        shard="1/4",
        max_retries=2,
        extra_stop=["x"],
        min_quality="good",
        instruction={"temperature": 0.5},
    )
    ps = cfg.pipeline_settings(concurrency=7)
    assert isinstance(ps, PipelineSettings)
    assert (ps.turns, ps.keep_truncated, ps.reasoning, ps.prejudge) == (3, True, "drop", True)
    assert (ps.shard_index, ps.shard_count, ps.concurrency) == (1, 4, 7)
    assert ps.retry == cfg.retry and ps.extra_stop == ["x"]
    assert ps.thresholds.min_quality == "good" and ps.instruction.temperature == 0.5
    assert cfg.start_retry.unreachable_budget == 0 and cfg.start_retry.max_retries == 2
