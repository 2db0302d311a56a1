"""Cleaning a generated instruction: strip it, or reject it with a reason."""

from __future__ import annotations

import re

from magpie.backends.base import Completion

#: Reject reasons an instruction can get here (counted in the run summary).
EMPTY = "empty"
TRUNCATED = "truncated"
SPECIAL_TOKEN = "special_token"
ROLE_LEAK = "role_leak"
REPETITION = "repetition"

# A role header leaked as plain text: "User:" / "### Assistant:" at the start of a
# line, or a line that is only a role word ("assistant" after a lost header).
_ROLE_LEAK_RE = re.compile(
    r"(?im)^\s*(?:#{1,4}\s*)?(?:user|assistant)\s*:|^\s*(?:user|assistant|system|model)\s*$"
)
_TOKEN_RE = re.compile(r"<\|[A-Za-z_][A-Za-z0-9_]*\|>")


#: A generation the server's repeat guard ended (finish reason "repeat") whose
#: text ends in at least this much white space was done: the model wrote its
#: text, then padding (runs of newlines) instead of its end-of-turn token.
PADDING_RUN = 8


def cut_in_a_loop(completion: Completion) -> bool:
    """Whether a generation was stopped in a loop: by magpie's own guard
    ("abort"), or by the server's repeat guard ("repeat") on a run of words
    rather than on white space after a finished text."""
    if completion.finish_reason == "abort":
        return True
    text = completion.text
    return completion.finish_reason == "repeat" and len(text) - len(text.rstrip()) < PADDING_RUN


def clean_instruction(completion: Completion, forbidden: list[str]) -> tuple[str, str | None]:
    """Return ``(instruction, None)`` or ``(text, reason)`` for a rejected one."""
    text = completion.text.strip()
    if not text:
        return text, EMPTY
    if completion.finish_reason == "length":
        return text, TRUNCATED
    if cut_in_a_loop(completion):
        return text, REPETITION
    if any(tok in text for tok in forbidden) or _TOKEN_RE.search(text):
        return text, SPECIAL_TOKEN
    if _ROLE_LEAK_RE.search(text):
        return text, ROLE_LEAK
    return text, None
