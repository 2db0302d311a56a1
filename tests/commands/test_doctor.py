"""``magpie.commands.doctor``: against a running and a stopped Ollama test server, a missing
model, an undetectable template, bad settings, and the embedded model."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from ollama_server import OllamaTestServer, ScriptedEngine, build_models
from rich.console import Console

from magpie.commands.doctor import (
    CHECKS,
    SMOKE_ATTEMPTS,
    SMOKE_INSTRUCTION_TOKENS,
    SMOKE_RESPONSE_TOKENS,
    Check,
    checks_to_json,
    doctor_exit_status,
    render_checks,
    run_doctor,
)
from magpie.errors import ExitStatus
from magpie.settings import RunConfig
from magpie.templates import family_names

MODEL = "llama3.1:8b"


def doctor(**settings: Any) -> list[Check]:
    checks = asyncio.run(run_doctor(RunConfig(**settings)))
    assert [c.name for c in checks] == list(CHECKS)
    return checks


def rendered(checks: list[Check]) -> str:
    out = io.StringIO()
    render_checks(checks, Console(file=out, width=200))
    return out.getvalue()


def assert_skipped_after(checks: list[Check], failed: str) -> Check:
    """``failed`` failed, the checks before it passed and the ones after were skipped."""
    at = CHECKS.index(failed)
    assert all(c.ok for c in checks[:at]), checks[:at]
    bad = checks[at]
    assert not bad.ok and not bad.skipped and bad.fix
    for later in checks[at + 1 :]:
        assert not later.ok and later.skipped
        assert later.detail == f"skipped: {failed} failed" and later.fix == ""
    return bad


@pytest.fixture()
def server() -> Iterator[OllamaTestServer]:
    with OllamaTestServer(build_models(["llama3.1", "unknown"], ScriptedEngine())) as srv:
        yield srv


def test_running_server_all_ok(server: OllamaTestServer) -> None:
    checks = doctor(model=MODEL, host=server.url)
    assert all(c.ok and not c.skipped and c.fix == "" for c in checks), checks
    assert doctor_exit_status(checks) == ExitStatus.OK
    backend, reachable, model, template, smoke = checks
    assert backend.detail.startswith(f"backend ollama: {MODEL} at {server.url}")
    assert reachable.detail == f"Ollama 0.6.0-test at {server.url}"
    assert model.detail.startswith(f"{MODEL} on {server.url} (llama, 8.0B, Q4_K_M), digest ")
    # The family, its source and the exact pre-query text, JSON-escaped.
    assert "family llama3 (source ollama-auto)" in template.detail
    assert 'pre-query "<|start_header_id|>user<|end_header_id|>\\n\\n"' in template.detail
    assert smoke.detail.startswith('instruction "') and '-> answer "Answer ' in smoke.detail
    # One pair with small limits, the answer through the chat template.
    gens = server.requests_to("/api/generate")
    chats = server.requests_to("/api/chat")
    assert len(gens) == 1 and len(chats) == 1 and server.requests_to("/api/version")
    assert gens[0].body["raw"] is True
    assert gens[0].body["options"]["num_predict"] == SMOKE_INSTRUCTION_TOKENS
    assert chats[0].body["options"]["num_predict"] == SMOKE_RESPONSE_TOKENS
    text = rendered(checks)
    assert text.count("✓") == 5 and "✗" not in text and "generate should work" in text


def test_stopped_server(server: OllamaTestServer) -> None:
    url = server.url
    server.stop()
    checks = doctor(model=MODEL, host=url, backend="ollama")
    bad = assert_skipped_after(checks, "reachable")
    assert bad.detail == f"Ollama is not reachable at {url}"
    assert "`ollama serve`" in bad.fix
    assert bad.exit_status == 3 and doctor_exit_status(checks) == ExitStatus.BACKEND_UNAVAILABLE
    text = rendered(checks)
    assert "✗" in text and "ollama serve" in text and "skipped: reachable failed" in text


def test_model_not_pulled(server: OllamaTestServer) -> None:
    checks = doctor(model="llama3.3:70b", host=server.url)
    bad = assert_skipped_after(checks, "model")
    assert bad.fix.startswith("pull it with `ollama pull llama3.3:70b`")
    assert "alfred:40b, llama3.1:8b" in bad.detail  # what is there instead
    assert doctor_exit_status(checks) == ExitStatus.BACKEND_UNAVAILABLE


def test_undetectable_template(server: OllamaTestServer) -> None:
    checks = doctor(model="alfred:40b", host=server.url)
    bad = assert_skipped_after(checks, "template")
    assert "cannot detect the template of model 'alfred:40b'" in bad.detail
    assert bad.fix.startswith("pass --template with one of: ")
    assert all(name in bad.fix for name in family_names())
    assert doctor_exit_status(checks) == ExitStatus.USAGE
    # Naming a family fixes it.
    fixed = doctor(model="alfred:40b", host=server.url, template="chatml")
    assert all(c.ok for c in fixed) and doctor_exit_status(fixed) == ExitStatus.OK
    assert "family chatml (source registry)" in fixed[3].detail


def test_bad_settings_fail_the_first_check() -> None:
    checks = doctor(template="no-such-family")
    bad = assert_skipped_after(checks, "backend")
    assert "unknown template 'no-such-family'" in bad.detail
    assert doctor_exit_status(checks) == ExitStatus.USAGE
    checks = doctor(backend="ollama", host="not a url")
    assert_skipped_after(checks, "backend")
    assert doctor_exit_status(checks) == ExitStatus.USAGE


def test_every_smoke_attempt_rejected() -> None:
    """An instruction cut by the token limit is rejected ("truncated") every time."""

    def text_fn(source: str | list[dict[str, Any]], options: Mapping[str, Any]) -> str:
        words = " ".join(f"w{i}" for i in range(500))  # no repeats: not a loop
        return words if isinstance(source, str) else "An answer."

    engine = ScriptedEngine(text_fn=text_fn)
    with OllamaTestServer(build_models(["llama3.1"], engine)) as srv:
        checks = doctor(model=MODEL, host=srv.url)
        assert len(srv.requests_to("/api/generate")) == SMOKE_ATTEMPTS
    bad = checks[-1]
    assert all(c.ok for c in checks[:-1]) and not bad.ok and not bad.skipped
    assert bad.detail.startswith(f"all {SMOKE_ATTEMPTS} attempts were rejected: truncated")
    assert "--template" in bad.fix
    assert doctor_exit_status(checks) == ExitStatus.ERROR


def test_exit_status_and_json() -> None:
    ok = Check(name="backend", ok=True, detail="fine")
    bad = Check(name="model", ok=False, detail="gone", fix="pull it", exit_status=3)
    skipped = Check(name="template", ok=False, detail="skipped: model failed", skipped=True)
    assert doctor_exit_status([ok]) == ExitStatus.OK
    assert doctor_exit_status([ok, bad, skipped]) == ExitStatus.BACKEND_UNAVAILABLE
    assert doctor_exit_status([]) == ExitStatus.ERROR
    data = json.loads(checks_to_json([ok, bad]))
    assert data[1] == {
        "name": "model",
        "ok": False,
        "detail": "gone",
        "fix": "pull it",
        "skipped": False,
        "exit_status": 3,
    }


@pytest.mark.slow
def test_embedded_backend() -> None:
    """The real SmolLM2 model, with small token limits."""
    checks = doctor(backend="embedded", n_ctx=1024)
    assert all(c.ok for c in checks), checks
    assert doctor_exit_status(checks) == ExitStatus.OK
    backend, reachable, model, template, smoke = checks
    assert backend.detail.startswith("backend embedded: SmolLM2-135M-Instruct")
    assert reachable.detail.startswith("llama-cpp-python ")
    assert model.detail.endswith(")") and ".gguf (" in model.detail and "MB GGUF" in model.detail
    assert "(source gguf-jinja" in template.detail and '"<|im_start|>' in template.detail
    assert smoke.detail.startswith('instruction "') and "-> answer " in smoke.detail


def test_openai_compatible_server_through_the_contract() -> None:
    """doctor asks the backend itself (``probe``, ``check_model``): no branch on
    its name, so an OpenAI-compatible server is checked like any other."""
    from openai_server import OpenAITestServer, smollm2_served

    served = smollm2_served(ScriptedEngine(), model_id="smollm2.gguf")
    with OpenAITestServer([served], flavor="llamacpp") as srv:
        checks = doctor(backend="openai", host=srv.url)
        assert all(c.ok for c in checks), checks
        reachable, model = checks[1], checks[2]
        assert reachable.detail == f"OpenAI-compatible server at {srv.url} (serves smollm2.gguf)"
        assert model.detail == f"smollm2.gguf on {srv.url}"
        bad = assert_skipped_after(doctor(backend="openai", host=srv.url, model="nope"), "model")
        assert "'nope' is not served" in bad.detail
        url = srv.url
    bad = assert_skipped_after(doctor(backend="openai", host=url), "reachable")
    assert bad.detail == f"OpenAI-compatible server is not reachable at {url}"
    assert bad.fix.startswith("start it") and bad.exit_status == 3
