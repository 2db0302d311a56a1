"""Detecting a generation stuck in a loop, while it streams.

Small models decoding greedily often fall into a loop ("I'm sorry, I'm sorry,
..." or the same paragraph again and again) that runs until the token limit:
every such answer costs the full ``max_tokens`` and is thrown away anyway.
:class:`RepetitionGuard` spots a tail that is the same block of text repeated
``min_repeats`` times (``min_chars`` characters in all) so the backend can stop
the generation at once; the pipeline rejects it as ``repetition``.
"""

from __future__ import annotations

import re


class RepetitionGuard:
    """Call with the text generated so far; True means "stuck in a loop"."""

    def __init__(
        self,
        *,
        min_repeats: int = 4,
        min_chars: int = 200,
        max_period: int = 400,
        check_every: int = 24,
    ) -> None:
        self.min_repeats = min_repeats
        self.min_chars = min_chars
        self.max_period = max_period
        self.check_every = check_every
        self._checked_at = 0
        self.tripped = False

    def __call__(self, text: str) -> bool:
        if self.tripped:
            return True
        n = len(text)
        if n < self.min_chars or n - self._checked_at < self.check_every:
            return False
        self._checked_at = n
        self.tripped = is_looping(text, self.min_repeats, self.min_chars, self.max_period)
        return self.tripped


def is_looping(
    text: str, min_repeats: int = 4, min_chars: int = 200, max_period: int = 400
) -> bool:
    """Whether ``text`` ends with one block repeated ``min_repeats`` times.

    Trailing white space is ignored; the repeated run must span at least
    ``min_chars`` characters, so short legitimate repeats ("ha ha ha") pass.
    """
    tail = text.rstrip()
    n = len(tail)
    for period in range(1, min(max_period, n // min_repeats) + 1):
        span = period * min_repeats
        if span < min_chars:
            continue
        block = tail[n - period :]
        if all(tail[n - (i + 1) * period : n - i * period] == block for i in range(1, min_repeats)):
            return True
    return False


_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|[a-zA-Z][.)])?\s*")


def repeated_lines(text: str, min_lines: int = 10, max_distinct: float = 0.5) -> bool:
    """Whether ``text`` is a list of mostly the same lines once their numbers
    and bullets are stripped (a model that loops with a counter: "1. Go.",
    "2. Go.", ...).  ``min_lines`` lines of two words or more at least; looping when the
    distinct ones are at most ``max_distinct`` of them."""
    lines = [_LIST_MARK.sub("", line).strip().lower() for line in text.splitlines()]
    lines = [line for line in lines if len(line.split()) >= 2]  # not "}", "---", "end"
    if len(lines) < min_lines:
        return False
    return len(set(lines)) <= max_distinct * len(lines)


def looped(text: str) -> bool:
    """The check of a finished text that the streaming guard may miss: a tail
    repeated 3 times over at least 48 characters (a short loop, under the
    guard's 200), or a list of mostly repeated lines."""
    return is_looping(text, min_repeats=3, min_chars=48) or repeated_lines(text)
