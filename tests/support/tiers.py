"""The test tiers, as a pytest plugin (loaded by ``tests/conftest.py``).

Every test is in one tier, by its markers:

``fast``
    everything not marked ``slow``: ``python -m pytest -m "not slow"``, about
    two minutes on 2 cores.
``slow``
    a test that loads a model, starts a real server or Ray, trains with TRL,
    drives a browser or runs longer than about 2 s.  Marked by rule where the
    cost is visible: a test under ``tests/real`` (also ``real``) or
    ``tests/ray`` (also ``ray``), a test that uses a fixture of
    :data:`SLOW_FIXTURES`; and by an explicit ``@pytest.mark.slow`` (or a
    module's ``pytestmark``) where it is not.
``real``, ``ray``
    the real-server and Ray tiers (both also ``slow``).

A run of several tiers runs them in that order (fast first), prints each
tier's wall time and count, and stops after the fast tier when a fast test
failed: a red fast tier fails at once.  A fast test that took longer than
:data:`FAST_LIMIT` is named in the summary (mark it ``slow``): the rule stays
true as tests are added, without a timed assertion.  Each tier has its own
per-test timeout (:data:`TIMEOUTS`), so a hang fails in minutes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
#: Tiers in the order they run.
ORDER = ("fast", "slow", "real", "ray")
#: Fixtures that load a model or start a model server: their tests are slow.
#: (The real servers' fixtures are under tests/real, a slow folder already.)
SLOW_FIXTURES = frozenset(
    {"smollm2_path", "smollm2_info", "llama_ollama", "smollm2_double", "llama_server"}
)
#: Folders whose tests are a tier of their own (and slow).
FOLDER_TIERS = {"real": "real", "ray": "ray"}
#: Seconds beyond which a fast test is named in the summary.
FAST_LIMIT = 2.0
#: The per-test timeout of each tier (seconds): the slowest honest test of the
#: tier with room to spare; a hang fails within it.
TIMEOUTS = {"fast": 60, "slow": 300, "real": 600, "ray": 600}


def tier_of(item: pytest.Item) -> str:
    for name in ("ray", "real", "slow"):
        if item.get_closest_marker(name) is not None:
            return name
    return "fast"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        folder = parts[0] if len(parts) > 1 else None
        if folder in FOLDER_TIERS:
            item.add_marker(getattr(pytest.mark, FOLDER_TIERS[folder]))
            item.add_marker(pytest.mark.slow)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUTS[tier_of(item)]))
    # Fast first, then slow, real, ray (stable within a tier).
    items.sort(key=lambda item: ORDER.index(tier_of(item)))


class _Clock:
    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.count: dict[str, int] = defaultdict(int)
        self.failed: dict[str, int] = defaultdict(int)
        self.over: list[tuple[str, float]] = []
        self.tiers_selected: set[str] = set()


_clock = _Clock()


def pytest_collection_finish(session: pytest.Session) -> None:
    _clock.tiers_selected = {tier_of(item) for item in session.items}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    tier = tier_of(item)
    _clock.start.setdefault(tier, time.monotonic())
    yield
    _clock.end[tier] = time.monotonic()
    _clock.count[tier] += 1
    if (
        tier == "fast"
        and _clock.failed["fast"]
        and (nextitem is None or tier_of(nextitem) != "fast")
        and _clock.tiers_selected - {"fast"}
    ):
        item.session.shouldstop = "the fast tier failed: the slow tiers were not run"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _clock.failed[_tier_of_report(report)] += 1
    slow = report.when == "call" and report.duration > FAST_LIMIT
    if slow and _tier_of_report(report) == "fast":
        _clock.over.append((report.nodeid, report.duration))


def _tier_of_report(report: pytest.TestReport) -> str:
    keywords = report.keywords
    for name in ("ray", "real", "slow"):
        if name in keywords:
            return name
    return "fast"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _clock.count:
        return
    tr = terminalreporter
    tr.section("tiers")
    for tier in ORDER:
        if tier in _clock.count:
            wall = _clock.end[tier] - _clock.start[tier]
            failed = f", {_clock.failed[tier]} failed" if _clock.failed[tier] else ""
            tr.write_line(f"{tier:>5}: {_clock.count[tier]} tests in {wall:.1f} s{failed}")
    if _clock.over:
        tr.write_line(
            f"fast tests that took over {FAST_LIMIT:g} s (mark them slow, or make them faster):"
        )
        for nodeid, duration in sorted(_clock.over, key=lambda x: -x[1]):
            tr.write_line(f"  {duration:5.1f} s  {nodeid}")
