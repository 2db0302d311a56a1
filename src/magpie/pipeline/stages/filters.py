"""Cheap rule filters on each user turn and each answer, run before any further
model call.

Each filter returns a reject reason or None.  :func:`build_filters` turns the
settings into the list that :class:`Filters` (a stage) runs on every user turn
(the instruction, and each follow-up question of ``--turns``: a follow-up is
an instruction too) after cleaning and before its answer is requested, so no
tokens are spent answering a question that will be thrown away.
:func:`build_answer_filters` gives the rules that also hold for an answer:
``--language`` (on its prose, code left out, from 8 words on) and the trailing colon (an
answer that announces content that never comes).  The length rules are no
answer rules (an answer's length is ``--response-max-tokens``' business, and a
right answer can be one word); repetition in answers is the loop check of
cleaning.  A rejected answer is ``response_<reason>``; the scheduler names a
rejection of turn N > 1 ``turnN_<reason>``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from magpie.pipeline.stages.base import Instruction, Stage
from magpie.records import Record, Rejection

InstructionFilter = Callable[[str], "str | None"]

_WORD_RE = re.compile(r"\w+", re.UNICODE)


class FilterSettings(BaseModel):
    """Rule filters (all on by default, except the language filter)."""

    model_config = ConfigDict(extra="forbid")

    min_words: int = Field(3, ge=0, description="fewer words: too_short")
    max_chars: int = Field(4000, ge=1, description="more characters: too_long")
    #: The reference drops instructions ending in ":" (they announce content that
    #: never comes: "Here is my essay:").
    reject_trailing_colon: bool = True
    #: ISO 639-1 code; None keeps every language.
    language: str | None = None
    #: Only reject a language mismatch the identifier is this sure of.
    language_confidence: float = Field(0.5, ge=0.0, le=1.0)
    #: Share of repeated word 3-grams above which an instruction is "repetitive".
    max_repeated_ngrams: float = Field(0.3, ge=0.0, le=1.0)


def too_short(min_words: int) -> InstructionFilter:
    def check(text: str) -> str | None:
        return "too_short" if len(_WORD_RE.findall(text)) < min_words else None

    return check


def too_long(max_chars: int) -> InstructionFilter:
    def check(text: str) -> str | None:
        return "too_long" if len(text) > max_chars else None

    return check


def trailing_colon(text: str) -> str | None:
    return "trailing_colon" if text.rstrip().endswith((":", "：")) else None


def repeated_ngrams(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, ->1 = a loop)."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repetitive(limit: float) -> InstructionFilter:
    def check(text: str) -> str | None:
        return "repetitive" if repeated_ngrams(text) > limit else None

    return check


@functools.lru_cache(maxsize=1)
def _identifier():  # type: ignore[no-untyped-def]
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ModuleNotFoundError:
        from magpie.errors import UsageError

        raise UsageError("--language needs the py3langid package: pip install py3langid") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) by py3langid (a maintained langid.py)."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


def language_is(target: str, confidence: float) -> InstructionFilter:
    target = target.lower()
    known = sorted(set(_identifier().nb_classes))  # fails early (exit 2) without the library
    if target not in known:
        from magpie.errors import UsageError

        raise UsageError(
            f"--language {target!r} is not a language code the identifier knows; "
            f"pick an ISO 639-1 code such as en, de, fr, zh (all: {' '.join(known)})"
        )

    def check(text: str) -> str | None:
        lang, prob = detect_language(text)
        if lang != target and prob >= confidence:
            return f"language_{lang}"
        return None

    return check


_CODE_BLOCK_RE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.S)


def prose(text: str) -> str:
    """``text`` without its code (fenced blocks and inline spans): the part whose
    language the identifier can tell."""
    return _CODE_BLOCK_RE.sub(" ", text)


#: An answer's language is told only from this many words of prose: a short
#: answer ("Paris, in France.") is too little text to tell a language by.
ANSWER_LANGUAGE_MIN_WORDS = 8


def on_prose(
    flt: InstructionFilter, min_words: int = ANSWER_LANGUAGE_MIN_WORDS
) -> InstructionFilter:
    """``flt`` on the prose of a text; a text with fewer than ``min_words``
    words of prose (all code, or a short answer) passes."""

    def check(text: str) -> str | None:
        rest = prose(text)
        return flt(rest) if len(_WORD_RE.findall(rest)) >= min_words else None

    return check


def build_filters(settings: FilterSettings) -> list[InstructionFilter]:
    filters: list[InstructionFilter] = []
    if settings.min_words:
        filters.append(too_short(settings.min_words))
    filters.append(too_long(settings.max_chars))
    if settings.reject_trailing_colon:
        filters.append(trailing_colon)
    if settings.max_repeated_ngrams < 1.0:
        filters.append(repetitive(settings.max_repeated_ngrams))
    if settings.language:
        filters.append(language_is(settings.language, settings.language_confidence))
    return filters


def build_answer_filters(settings: FilterSettings) -> list[InstructionFilter]:
    """The rules that hold for answers too (each one's reason is then
    ``response_<reason>``): the language of ``--language`` and the trailing colon."""
    filters: list[InstructionFilter] = []
    if settings.reject_trailing_colon:
        filters.append(trailing_colon)
    if settings.language:
        filters.append(on_prose(language_is(settings.language, settings.language_confidence)))
    return filters


def first_reason(filters: list[InstructionFilter], text: str) -> str | None:
    for flt in filters:
        reason = flt(text)
        if reason is not None:
            return reason
    return None


def record_reason(
    record: Record, filters: list[InstructionFilter], answers: list[InstructionFilter]
) -> str | None:
    """The first rule a record breaks, turn by turn (``magpie filter``), named as
    a run names it: ``too_short``, ``response_language_de``, ``turn2_too_short``..."""
    turn = 0
    for msg in record.messages:
        if msg.role == "user":
            turn += 1
            reason = first_reason(filters, msg.content)
        elif msg.role == "assistant":
            reason = first_reason(answers, msg.content)
            reason = f"response_{reason}" if reason is not None else None
        else:
            continue
        if reason is not None:
            return reason if turn <= 1 else f"turn{turn}_{reason}"
    return None


class Filters(Stage):
    """The rule filters in order, on each user turn (the first reason rejects
    it) and, with ``answers``, on each answer (``response_<reason>``)."""

    def __init__(
        self, filters: list[InstructionFilter], answers: list[InstructionFilter] | None = None
    ) -> None:
        self.filters = list(filters)
        self.answers = list(answers or [])

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        reason = first_reason(self.filters, candidate.text)
        if reason is not None:
            return Rejection(
                index=candidate.index, reason=reason, stage="instruction", text=candidate.text
            )
        return candidate

    async def on_answer(self, candidate: Instruction, record: Record) -> Record | Rejection:
        reason = first_reason(self.answers, record.messages[-1].content)
        if reason is None:
            return record
        return Rejection(
            index=record.index,
            reason=f"response_{reason}",
            stage="response",
            text=candidate.text,
            record=record,
        )
