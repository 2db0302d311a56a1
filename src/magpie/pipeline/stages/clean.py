"""Cleaning model-written text: strip it, or reject it with a reason.

Every text the model wrote that is ever rendered back into a template (the
instruction, each response, each follow-up, the text a judge reads) passes
:func:`~magpie.templates.injection.template_reason` first (the test user-given
text passes too): a special token or a role header in it would
forge a turn inside the model's real template.  :class:`Clean` is the first
stage of every pipeline (:func:`clean_instruction` on the candidate);
:func:`clean_response` checks each answer as it is generated.
"""

from __future__ import annotations

from magpie.backends.base import Completion
from magpie.pipeline.repetition import looped
from magpie.pipeline.stages.base import Instruction, Stage
from magpie.pipeline.stages.reasoning import marker_in, split_reasoning
from magpie.records import Rejection
from magpie.templates.injection import template_reason

#: Reject reasons an instruction can get here (counted in the run summary),
#: besides ``special_token`` and ``role_leak`` (:mod:`magpie.templates.injection`).
EMPTY = "empty"
TRUNCATED = "truncated"
REPETITION = "repetition"


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
    if cut_in_a_loop(completion) or looped(text):
        return text, REPETITION
    return text, template_reason(text, forbidden)


class Clean(Stage):
    """The instruction stripped, or rejected as no usable instruction at all."""

    saves_response = False

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        text, reason = clean_instruction(candidate.completion, candidate.forbidden)
        if reason is not None:
            return Rejection(index=candidate.index, reason=reason, stage="instruction", text=text)
        candidate.text = text
        return candidate


def clean_response(
    completion: Completion, forbidden: list[str], *, keep_reasoning: bool, keep_truncated: bool
) -> tuple[Completion, str | None]:
    """A chat answer and its reject reason (None when it is usable): an answer
    is rendered back into the template (turn 2, the judge), so it gets the
    instruction's special-token and role-header rules.

    The answer's reasoning is split off (:func:`split_reasoning`): the
    completion returned has the answer alone as ``text`` and the reasoning as
    ``thinking`` (None unless ``keep_reasoning``).  Reasoning is written into
    the record (and into a chat template when the data is trained on), so it
    gets the same token rules."""
    if cut_in_a_loop(completion) or looped(completion.text + (completion.thinking or "")):
        return completion, "response_repetition"
    answer, reasoning, unfinished = split_reasoning(completion)
    completion = completion.model_copy(
        update={"text": answer, "thinking": reasoning if keep_reasoning else None}
    )
    if not answer:
        if completion.finish_reason == "length" and not keep_truncated:
            return completion, "response_truncated"
        return completion, "reasoning_only" if (reasoning or unfinished) else "empty_response"
    if completion.finish_reason == "length" and not keep_truncated:
        return completion, "response_truncated"
    leak = template_reason(answer, forbidden)
    if leak is not None:
        return completion, f"response_{leak}"
    if marker_in(answer):
        return completion, "response_reasoning_leak"
    if keep_reasoning and reasoning is not None:
        leak = template_reason(reasoning, forbidden)
        if leak is not None:
            return completion, f"reasoning_{leak}"
        if marker_in(reasoning):
            return completion, "reasoning_markup"
    return completion, None
