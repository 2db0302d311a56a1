"""Reasoning models: split an answer's thinking from its text, and keep thinking
out of instructions.

A reasoning model's answer reaches magpie in one of three shapes:

* apart, from the server: Ollama's ``message.thinking`` (its thinking parser, or
  gpt-oss's harmony parser), an OpenAI-compatible server's ``reasoning_content``
  (:attr:`magpie.backends.base.Completion.thinking`);
* inline, ``<think>...</think>`` before the answer (Qwen3, DeepSeek-R1 when the
  server does not parse it, the embedded backend), or only ``...</think>`` when
  the chat template opened the block itself (DeepSeek-R1's and Qwen3-Thinking's
  generation prompt ends with ``<think>``);
* harmony (gpt-oss) channels written out:
  ``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...``.

:func:`split_reasoning` turns each into ``(answer, reasoning)``.  What the run
does with the reasoning is ``--reasoning``: ``keep`` it in the record
(``reasoning``, and ``reasoning_content`` on the assistant message, the field
TRL / Qwen3 chat templates read), ``drop`` it, or ``off``: ask the model not to
think (Ollama ``think: false``; ``chat_template_kwargs.enable_thinking: false``
on OpenAI-compatible servers) and drop whatever reasoning comes anyway.
"""

from __future__ import annotations

import re
from typing import Literal

from magpie.backends.base import Completion
from magpie.pipeline.stages.base import Instruction, Stage
from magpie.records import Rejection

ReasoningMode = Literal["keep", "drop", "off"]
REASONING_MODES: tuple[str, ...] = ("keep", "drop", "off")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: Harmony (gpt-oss) control tokens.
HARMONY_TOKENS: tuple[str, ...] = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
)
#: Text that means reasoning (or its markup) is in a string that must hold none:
#: an instruction, or an answer once its reasoning was split off.
REASONING_MARKERS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, "<|channel|>")

_HARMONY_MESSAGE = re.compile(
    r"(?:<\|start\|>assistant)?<\|channel\|>(?P<channel>\w+)[^<]*<\|message\|>"
    r"(?P<text>.*?)(?:<\|end\|>|<\|return\|>|<\|call\|>|(?=<\|start\|>)|\Z)",
    re.S,
)


def think_request(mode: ReasoningMode) -> bool | None:
    """What a chat request asks of the model's thinking: ``off`` asks it not to
    think; ``keep``/``drop`` leave it to the server (Ollama thinks when the model
    can, and returns the thinking apart)."""
    return False if mode == "off" else None


def _harmony(text: str) -> tuple[str, str] | None:
    """(final, analysis) of harmony-formatted text, or None if it is not harmony."""
    if "<|channel|>" not in text or "<|message|>" not in text:
        return None
    finals: list[str] = []
    thoughts: list[str] = []
    for m in _HARMONY_MESSAGE.finditer(text):
        (finals if m["channel"] == "final" else thoughts).append(m["text"].strip())
    if not finals and not thoughts:
        return None
    return "\n".join(f for f in finals if f), "\n\n".join(t for t in thoughts if t)


def split_reasoning(completion: Completion) -> tuple[str, str | None, bool]:
    """The answer, its reasoning (None when there is none) and whether the
    reasoning was left unfinished (a ``<think>`` never closed: the model was cut
    off while thinking).

    Reasoning the server returned apart comes first; inline reasoning is found at
    the start of the text only (a ``<think>`` later on is an answer that talks
    about tags, which the leak check then rejects)."""
    text = completion.text
    parts: list[str] = []
    if completion.thinking and completion.thinking.strip():
        parts.append(completion.thinking.strip())
    unfinished = False
    harmony = _harmony(text)
    if harmony is not None:
        text, thought = harmony
        if thought:
            parts.append(thought)
    else:
        head = text.lstrip()
        if head.startswith(THINK_OPEN):
            body = head[len(THINK_OPEN) :]
            if THINK_CLOSE in body:
                thought, _, text = body.partition(THINK_CLOSE)
            else:
                thought, text, unfinished = body, "", True
            if thought.strip():
                parts.append(thought.strip())
        elif THINK_CLOSE in text and THINK_OPEN not in text:
            # The template opened the block (its generation prompt ends in <think>).
            thought, _, text = text.partition(THINK_CLOSE)
            if thought.strip():
                parts.append(thought.strip())
    reasoning = "\n\n".join(parts) or None
    return text.strip(), reasoning, unfinished


def marker_in(text: str) -> str | None:
    """The first reasoning marker in ``text``, or None."""
    for marker in REASONING_MARKERS:
        if marker in text:
            return marker
    return None


def instruction_reason(completion: Completion, text: str) -> str | None:
    """``reasoning_in_instruction`` when an instruction holds thinking: the server
    returned some with it, or the text has thinking markup; else None."""
    if (completion.thinking and completion.thinking.strip()) or marker_in(text):
        return "reasoning_in_instruction"
    return None


class NoReasoning(Stage):
    """An instruction that holds thinking is rejected (``reasoning_in_instruction``)."""

    saves_response = False

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        reason = instruction_reason(candidate.completion, candidate.text)
        if reason is not None:
            return Rejection(
                index=candidate.index, reason=reason, stage="instruction", text=candidate.text
            )
        return candidate
