"""Progress on stderr: a tqdm bar (only on a terminal) and the summary line."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from magpie.records import Record, Rejection
from magpie.stats import RunStats


class Progress:
    """A tqdm bar of records written, with kept/rejected counts and pairs/s.

    Shown only when stderr is a terminal (never in cron logs) and not quiet.
    """

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar: Any = None

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

    def update(self, item: Record | Rejection, stats: RunStats) -> None:
        if self._bar is None:
            return
        if isinstance(item, Record):
            self._bar.update(1)
        self._bar.set_postfix(kept=stats.written, rejected=stats.rejected_total, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
