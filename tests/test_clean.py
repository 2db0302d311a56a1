"""Instruction cleaning: each reject reason, and clean text passing through."""

from __future__ import annotations

import pytest

from magpie.backends.base import Completion
from magpie.clean import clean_instruction
from magpie.templates import get_family

FORBIDDEN = get_family("llama3").forbidden_tokens


def c(text: str, reason: str = "stop") -> Completion:
    return Completion(text=text, finish_reason=reason)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (c("  What is the capital of France?\n"), None),
        (c("Write a poem.\nIt should rhyme, and mention a user interface."), None),
        (c("Model: Toyota Camry 2019. What is its resale value?"), None),
        (c("   \n "), "empty"),
        (c("Explain quantum computing in", "length"), "truncated"),
        (c("Hello<|eot_id|>"), "special_token"),
        (c("Tell me a joke <|im_end|>"), "special_token"),
        (c("What is 2+2?\nassistant\n\nIt is 4."), "role_leak"),
        (c("User: what is a monad?"), "role_leak"),
        (c("### Assistant: sure"), "role_leak"),
    ],
)
def test_clean(completion: Completion, reason: str | None) -> None:
    text, got = clean_instruction(completion, FORBIDDEN)
    assert got == reason
    assert text == completion.text.strip()
