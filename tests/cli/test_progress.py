"""The progress bar: counts drawn at once, a clock that moves between records."""

from __future__ import annotations

import io
import time

from samples import make_record

from magpie.cli.progress import Progress
from magpie.pipeline.counters import RunStats


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_the_new_count_and_keeps_ticking() -> None:
    term = Terminal()
    progress = Progress(stream=term, tick=0.05)
    progress.start(total=3)
    stats = RunStats()
    stats.written = 1
    progress.update(make_record(0), stats)
    drawn = term.getvalue().count("\r")
    time.sleep(0.5)  # no record meanwhile: the bar is redrawn anyway
    assert term.getvalue().count("\r") > drawn + 3
    last = term.getvalue().split("\r")[-1]
    assert "1/3" in last and "kept=1" in last  # the bar and its count agree
    progress.close()
    quiet = Terminal()
    off = Progress(enabled=False, stream=quiet)
    off.start(total=3)
    off.update(make_record(0), stats)
    off.close()
    assert quiet.getvalue() == ""
