"""Category balance (``--balance``): keep the judge's ``task_category`` spread
near an even target.

Each category of the target gets a cap of ``ceil(total / K * (1 + tolerance))``
records, ``total`` the records the output should hold and K the categories
(``--categories``, or all twelve).  A record over its category's cap is
rejected as ``over_quota``:

- with ``--prejudge``, before its response is generated: the instruction's
  category is reserved when its verdict arrives, and refused when the records
  kept plus the reservations in flight already fill the cap;
- always, exactly, when records are emitted in index order (so the counts
  never exceed a cap, whatever the timing of concurrent attempts); a
  reservation is released when its attempt ends.

The records already in the output count (a top-up keeps balancing).  A model
that never writes some categories cannot fill their caps: the run then stops
at the reject streak with a message that names the counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

from magpie.pipeline.stages.base import Instruction, Stage
from magpie.records import CATEGORIES, Record, Rejection

REASON = "over_quota"


class CategoryBalance(Stage):
    """The caps of an even category spread, and the counts against them (a
    stage: :meth:`reserve` on the pre-judge's verdict, :meth:`settle` at emit,
    :meth:`unsettle` when a later stage rejects a settled record)."""

    def __init__(
        self,
        total: int,
        categories: Iterable[str] | None = None,
        tolerance: float = 0.25,
        existing: Mapping[str, int] | None = None,
    ) -> None:
        self.categories = list(categories or CATEGORIES)
        self.tolerance = tolerance
        self.cap = max(1, math.ceil(total / len(self.categories) * (1 + tolerance)))
        self.kept: Counter[str] = Counter(existing or {})
        self._reserved: dict[int, str] = {}

    def reserved(self, category: str) -> int:
        return sum(1 for c in self._reserved.values() if c == category)

    def reserve(self, index: int, category: str | None) -> str | None:
        """At prejudge: ``over_quota`` when the category is full counting the
        reservations in flight, else None (and the slot is held for ``index``)."""
        if category is None or category not in self.categories:
            return None  # --categories decides about those
        if self.kept[category] + self.reserved(category) >= self.cap:
            return REASON
        self._reserved[index] = category
        return None

    def settle(self, result: Record | Rejection) -> Record | Rejection:
        """At emit, in index order: release the attempt's reservation, and turn
        a record over its category's cap into an ``over_quota`` rejection."""
        self._reserved.pop(result.index, None)
        if not isinstance(result, Record) or result.judge is None:
            return result
        category = result.judge.task_category
        if category is None or category not in self.categories:
            return result
        if self.kept[category] >= self.cap:
            return Rejection(
                index=result.index,
                reason=REASON,
                stage="judge",
                text=result.instruction,
                detail=f"{category}: {self.kept[category]} of {self.cap} kept",
                record=result,
            )
        self.kept[category] += 1
        return result

    def unsettle(self, record: Record) -> None:
        """Undo :meth:`settle` for a record rejected after it (a duplicate)."""
        category = record.judge.task_category if record.judge is not None else None
        if category in self.categories and self.kept[category] > 0:
            self.kept[category] -= 1

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        if candidate.verdict is None:  # no --prejudge: settled at emit only
            return candidate
        reason = self.reserve(candidate.index, candidate.verdict.task_category)
        if reason is not None:
            return Rejection(
                index=candidate.index, reason=reason, stage="instruction", text=candidate.text
            )
        return candidate

    async def on_emit(self, result: Record | Rejection) -> Record | Rejection:
        return self.settle(result)

    def revoke(self, record: Record) -> None:
        self.unsettle(record)

    def describe(self) -> str:
        """The counts against the caps, for the reject-streak message."""
        counts = ", ".join(f"{c} {self.kept[c]}" for c in self.categories if self.kept[c])
        return f"cap {self.cap} per category; kept: {counts or 'none'}"
