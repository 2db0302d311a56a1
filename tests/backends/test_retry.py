"""magpie.backends.retry: the one retry policy, counted by kind."""

from __future__ import annotations

import asyncio

import pytest

from magpie.backends.retry import RetryPolicy, call_with_retry
from magpie.errors import BackendError, BackendUnavailable

FAST = RetryPolicy(max_retries=2, backoff_base=0.0, unreachable_budget=60.0)


def script(*outcomes: BaseException | str):  # type: ignore[no-untyped-def]
    """A request that fails (or answers) in the given order."""
    calls = []

    async def fn() -> str:
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return fn, calls


def down() -> BackendUnavailable:
    return BackendUnavailable("down")


def busy() -> BackendError:
    return BackendError("503", cause="http_503")


def test_an_outage_does_not_use_up_max_retries() -> None:
    """Ten refused connections, then two errors: still within --max-retries 2."""
    fn, calls = script(*[down() for _ in range(10)], busy(), busy(), "ok")
    causes: list[str] = []
    assert asyncio.run(call_with_retry(fn, FAST, causes.append)) == "ok"
    assert causes == ["unreachable"] * 10 + ["http_503"] * 2
    assert len(calls) == 13


def test_failures_still_run_out() -> None:
    fn, _ = script(busy(), down(), busy(), busy(), "never")
    with pytest.raises(BackendError):
        asyncio.run(call_with_retry(fn, FAST))


def test_the_unreachable_budget_still_ends_an_outage() -> None:
    fn, calls = script(*[down() for _ in range(50)])
    policy = FAST.model_copy(update={"unreachable_budget": 0.0})
    with pytest.raises(BackendUnavailable):
        asyncio.run(call_with_retry(fn, policy))
    assert len(calls) == 1


def test_non_retryable_errors_are_not_retried() -> None:
    fn, calls = script(BackendError("400", retryable=False, cause="http_400"), "never")
    with pytest.raises(BackendError):
        asyncio.run(call_with_retry(fn, FAST))
    assert len(calls) == 1


def test_run_config_passes_every_backoff_setting() -> None:
    from magpie.settings import RunConfig

    policy = RunConfig(
        max_retries=7, backoff_base=0.05, backoff_max=0.2, unreachable_budget=9.0
    ).retry
    assert (policy.max_retries, policy.backoff_base, policy.backoff_max) == (7, 0.05, 0.2)
    assert policy.unreachable_budget == 9.0
    assert all(policy.delay(a) <= 0.2 for a in range(1, 10))
