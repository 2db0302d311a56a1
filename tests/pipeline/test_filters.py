"""Rule filters on instructions."""

from __future__ import annotations

import pytest

from magpie.pipeline.stages.filters import (
    FilterSettings,
    build_filters,
    detect_language,
    repeated_ngrams,
)


def first_reason(text: str, **settings: object) -> str | None:
    for f in build_filters(FilterSettings(**settings)):  # type: ignore[arg-type]
        reason = f(text)
        if reason:
            return reason
    return None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("How do I bake sourdough bread at home?", None),
        ("Hello", "too_short"),
        ("Here is my essay, please review it:", "trailing_colon"),
        ("x " * 3000, "too_long"),
        ("the cat sat on the mat " * 8, "repetitive"),
    ],
)
def test_rules(text: str, reason: str | None) -> None:
    assert first_reason(text) == reason


def test_language() -> None:
    assert detect_language("Can you explain how photosynthesis works in plants?")[0] == "en"
    assert (
        first_reason(
            "¿Puedes explicarme cómo funciona la fotosíntesis en las plantas?", language="en"
        )
        == "language_es"
    )
    assert (
        first_reason("Can you explain how photosynthesis works in plants?", language="en") is None
    )
    assert (
        first_reason(
            "Erkläre mir bitte, wie die Photosynthese in Pflanzen funktioniert.", language="de"
        )
        is None
    )


def test_repeated_ngrams_share() -> None:
    assert repeated_ngrams("a b c d e f g h") == 0.0
    assert repeated_ngrams("a b c a b c a b c a b c") > 0.5
