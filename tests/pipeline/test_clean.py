"""Instruction cleaning: each reject reason, and clean text passing through."""

from __future__ import annotations

import pytest

from magpie.backends.base import Completion
from magpie.pipeline.stages.clean import clean_instruction
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


LOOP_194 = (
    "I picture a 4-box detective window, which is a 4-box detective window, which is a "
    "4-box detective window, which is a 4-box detective window, which is a 4-box detective "
    "window"
)
COUNTED_LOOP = "\n".join(
    f"{i}. {['Check the lock.', 'Check the window.', 'Call the office.'][i % 3]}"
    for i in range(1, 53)
)


@pytest.mark.parametrize(
    ("text", "is_loop"),
    [
        (LOOP_194, True),  # under the streaming guard's 200 characters
        (COUNTED_LOOP, True),  # 52 lines, 3 distinct once the numbers go
        ("Ha ha ha ha. That was funny.", False),
        ("\n".join(f"{i}. Step {i}: add {i} grams of salt." for i in range(1, 20)), False),
        (
            "int main() {\n"
            + "".join(f"  if (x{i}) {{\n    y({i});\n  }}\n" for i in range(12))
            + "}\n",
            False,
        ),
    ],
)
def test_loops_the_streaming_guard_misses(text: str, is_loop: bool) -> None:
    from magpie.pipeline.repetition import looped

    assert looped(text) is is_loop
    reason = clean_instruction(Completion(text=text, finish_reason="stop"), [])[1]
    assert (reason == "repetition") is is_loop
