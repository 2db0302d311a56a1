"""Progress on stderr: a tqdm bar (only on a terminal) and the summary line."""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from magpie.pipeline.counters import RunStats
from magpie.records import Record, Rejection


class Progress:
    """A tqdm bar of records written, with kept/rejected counts and pairs/s.

    Shown only when stderr is a terminal (never in cron logs) and not quiet.
    Redrawn every ``tick`` seconds between records too, so that its clock and
    rate keep moving while a slow pair is in flight.
    """

    def __init__(
        self, *, enabled: bool = True, stream: TextIO | None = None, tick: float = 1.0
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tick = tick
        self._bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self, total: int, initial: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="pair",
            file=self.stream,
            disable=None,  # None: off when the stream is not a TTY
            dynamic_ncols=True,
            smoothing=0.1,
        )
        if not self._bar.disable and self.tick > 0:
            self._ticker = threading.Thread(target=self._tick, name="magpie-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def update(self, item: Record | Rejection, stats: RunStats) -> None:
        if self._bar is None:
            return
        # The counts first: update() draws, and must draw the new ones.
        self._bar.set_postfix(kept=stats.written, rejected=stats.rejected_total, refresh=False)
        if isinstance(item, Record):
            self._bar.update(1)
        else:
            self._bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
