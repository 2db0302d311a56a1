"""Detecting a generation stuck in a loop, while it streams.

Small models decoding greedily often fall into a loop ("I'm sorry, I'm sorry,
..." or the same paragraph again and again) that runs until the token limit:
every such answer costs the full ``max_tokens`` and is thrown away anyway.
:class:`RepetitionGuard` spots a tail that is the same block of text repeated
``min_repeats`` times (``min_chars`` characters in all) so the backend can stop
the generation at once; the pipeline rejects it as ``repetition``.
"""

from __future__ import annotations


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
