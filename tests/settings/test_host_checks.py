"""``--host`` (and ``--judge-host``, ``--semantic-host``) are checked before any
work by the rules of the backend that will use them, through the traits table
(``BackendTraits.check_url``): an OpenAI-compatible base URL may carry a path
(``/v1``, a proxy's ``/api/v1``) and https; what the ollama client would not
take is still refused for Ollama."""

from __future__ import annotations

from pathlib import Path

import pytest
from real_servers import free_port
from typer.testing import CliRunner

from magpie.cli.app import app
from magpie.commands.generate import check_run
from magpie.errors import ExitStatus, UsageError
from magpie.settings import BACKENDS, RunConfig

#: Base URLs of OpenAI-compatible servers, as their users write them.
OPENAI_URLS = [
    "http://127.0.0.1:8000/v1",
    "https://api.example.com/v1",
    "https://openrouter.ai/api/v1",  # a gateway whose API lives under /api/v1
    "http://127.0.0.1:8080/api/v1/",
    "gpu1:8000",
]
#: What Ollama's client (or an Ollama server) would not take.
BAD_FOR_OLLAMA = [
    "http://127.0.0.1:11434/api",
    "http://127.0.0.1:11434/api/generate",
    "http://127.0.0.1:99999",
    "ftp://x",
    "not a url",
]
#: What no backend takes.
BAD_FOR_EVERY_BACKEND = ["", "ftp://x:1", "not a url", "http://x:99999", "http://x:port"]


@pytest.mark.parametrize("url", OPENAI_URLS)
def test_openai_base_urls_pass(url: str) -> None:
    check_run(RunConfig(backend="openai", model="m", host=url))
    check_run(RunConfig(backend="openai", model="m", host=["http://a:8000/v1", url]))


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434", "https://ollama.example.com", "gpu1"])
@pytest.mark.parametrize("backend", ["auto", "ollama"])
def test_ollama_hosts_pass(backend: str, url: str) -> None:
    check_run(RunConfig(backend=backend, model="m", host=url))


@pytest.mark.parametrize("url", BAD_FOR_OLLAMA)
@pytest.mark.parametrize("backend", ["auto", "ollama", "embedded"])
def test_ollama_hosts_are_refused_by_its_rules(backend: str, url: str) -> None:
    with pytest.raises(UsageError, match=r"^--host "):
        check_run(RunConfig(backend=backend, host=url))


@pytest.mark.parametrize("url", BAD_FOR_EVERY_BACKEND)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bad_hosts_are_refused_by_every_backend(backend: str, url: str) -> None:
    with pytest.raises(UsageError, match=r"^--host "):
        check_run(RunConfig(backend=backend, model="m", host=url))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1?key=1", "http://127.0.0.1:8000/v1#x"])
def test_openai_url_with_a_query_is_refused(url: str) -> None:
    """A base URL has paths appended (``/v1/completions``): a query or a
    fragment would end up in the middle of each request's URL."""
    with pytest.raises(UsageError, match="not a URL"):
        check_run(RunConfig(backend="openai", model="m", host=url))


def test_judge_host_is_checked_by_the_judges_backend() -> None:
    url = "https://openrouter.ai/api/v1"
    check_run(
        RunConfig(backend="ollama", model="m", judge="j", judge_backend="openai", judge_host=url)
    )
    with pytest.raises(UsageError, match=r"^--judge-host .* API path"):
        check_run(RunConfig(backend="ollama", model="m", judge="j", judge_host=url))
    with pytest.raises(UsageError, match=r"^--judge-host 'ftp://x'"):
        check_run(RunConfig(model="m", judge="j", judge_backend="openai", judge_host="ftp://x"))


def test_semantic_host_is_checked_by_its_backend() -> None:
    url = "https://embed.example.com/api/v1"
    check_run(
        RunConfig(model="m", semantic_model="e", semantic_backend="openai", semantic_host=url)
    )
    with pytest.raises(UsageError, match=r"^--semantic-host .* API path"):
        check_run(
            RunConfig(model="m", semantic_model="e", semantic_backend="ollama", semantic_host=url)
        )


def test_generate_with_an_openai_url_with_a_path_reaches_the_server() -> None:
    """The CLI: such a URL is not refused as a usage error (exit 2); magpie
    goes to the server (none listens here: exit 3)."""
    url = f"http://127.0.0.1:{free_port()}/api/v1"
    result = CliRunner().invoke(
        app, ["generate", "-n", "1", "--backend", "openai", "--model", "m", "--host", url]
    )
    assert result.exit_code == ExitStatus.BACKEND_UNAVAILABLE, result.output
    assert "not reachable at http://127.0.0.1" in result.stderr


def test_doctor_with_an_openai_url_with_a_path_reaches_the_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v1"
    result = CliRunner().invoke(
        app, ["doctor", "--backend", "openai", "--model", "m", "--host", url, "--json"]
    )
    assert result.exit_code == ExitStatus.BACKEND_UNAVAILABLE, result.output
    assert '"name": "reachable"' in result.stdout


# ----------------------------------------------------------------- the words


def test_hosts_down_say_how_to_start_their_own_server() -> None:
    """Several OpenAI-compatible hosts, none up: the fix is theirs (``vllm
    serve``, ``llama-server``), not Ollama's."""
    hosts = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    args = ["generate", "-n", "1", "--backend", "openai", "--model", "m"]
    result = CliRunner().invoke(app, [*args, "--host", hosts[0], "--host", hosts[1]])
    assert result.exit_code == ExitStatus.BACKEND_UNAVAILABLE, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "none of the 2 hosts is reachable" in line and "vllm serve" in line, line
    assert "ollama" not in line.lower(), line


def test_no_ollama_only_words_for_every_backend() -> None:
    """The help of the options that name a server, and the package's
    description, say what every backend takes, not Ollama alone."""
    for command, option in (
        ("generate", "--host"),
        ("generate", "--judge-host"),
        ("doctor", "--host"),
        ("filter", "--judge-host"),
    ):
        text = CliRunner().invoke(app, [command, "--help"], terminal_width=400).output
        line = next(ln for ln in text.splitlines() if option in ln)
        assert "Ollama URL" not in line, line
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    description = next(
        ln for ln in pyproject.read_text().splitlines() if ln.startswith("description = ")
    )
    assert "OpenAI-compatible" in description
