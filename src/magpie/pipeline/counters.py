"""Counters of a run: what was kept, rejected (by reason), retried (by cause)."""

from __future__ import annotations

import time
from array import array
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RunStats:
    written: int = 0
    attempts: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    #: Records that were already in the output before this run (top-up).
    existing: int = 0
    #: Instructions rejected before a response was requested, and the response
    #: tokens so far (to estimate what the early rejections saved).
    saved_responses: int = 0
    #: 64-bit hashes of the normalised instructions written, one per record (for
    #: the unique share): 8 bytes a record where a set of ints took 140.  Not in
    #: the repr: ``asyncio.run`` formats its main task's result once at the end,
    #: and 100,000 hashes would make that a transient of 10 MB.
    instruction_hashes: array[int] = field(default_factory=lambda: array("q"), repr=False)
    #: Pairs answered per host, when a run spreads over several.
    per_host: dict[str, int] = field(default_factory=dict)
    response_tokens: int = 0
    responses: int = 0
    _unique: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self.started)

    @property
    def pairs_per_second(self) -> float:
        return self.written / self.elapsed

    def add_tokens(self, prompt: int | None, completion: int | None) -> None:
        self.prompt_tokens += prompt or 0
        self.completion_tokens += completion or 0

    def add_instruction(self, text: str) -> None:
        self.instruction_hashes.append(hash(" ".join(text.casefold().split())))

    @property
    def unique_instructions(self) -> int:
        """Distinct instructions among those written (counted when asked)."""
        hashes = self.instruction_hashes
        if self._unique is None or self._unique[0] != len(hashes):
            import numpy as np

            self._unique = (len(hashes), int(np.unique(np.frombuffer(hashes, np.int64)).size))
        return self._unique[1]

    @property
    def unique_share(self) -> float:
        return self.unique_instructions / self.written if self.written else 1.0

    def add_response(self, completion_tokens: int | None) -> None:
        if completion_tokens:
            self.response_tokens += completion_tokens
            self.responses += 1

    @property
    def saved_tokens(self) -> int:
        """Response tokens not spent thanks to early rejections (estimated)."""
        if not self.responses:
            return 0
        return round(self.saved_responses * self.response_tokens / self.responses)

    def summary(self) -> str:
        """The one-line summary printed at the end of a run."""
        parts = [f"{self.written} written"]
        if self.written:
            parts.append(f"{self.unique_share:.0%} unique instructions")
        if self.existing:
            parts.append(f"{self.existing} already there")
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
        parts.append(f"{self.rejected_total} rejected" + (f" ({rej})" if rej else ""))
        if self.retries:
            ret = ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items()))
            parts.append(f"{sum(self.retries.values())} retries ({ret})")
        parts.append(f"{self.prompt_tokens + self.completion_tokens} tokens")
        if self.saved_tokens:
            parts.append(f"~{self.saved_tokens} response tokens saved by early rejects")
        if self.per_host:
            hosts = ", ".join(f"{h} {n}" for h, n in sorted(self.per_host.items()))
            parts.append(f"pairs per host: {hosts}")
        parts.append(f"{self.elapsed:.1f} s")
        parts.append(f"{self.pairs_per_second:.2f} pairs/s")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "written": self.written,
            "existing": self.existing,
            "attempts": self.attempts,
            "rejected": dict(self.rejected),
            "retries": dict(self.retries),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "saved_tokens": self.saved_tokens,
            "unique_share": round(self.unique_share, 4),
            "per_host": dict(self.per_host),
            "elapsed_s": round(self.elapsed, 3),
        }
