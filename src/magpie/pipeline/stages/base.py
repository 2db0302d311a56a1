"""The one protocol of a pipeline stage, and the candidate it is handed.

A stage sees an attempt at four points, each explicit because the work there
differs:

``on_instruction(candidate)``
    Each user turn, before its answer is generated: the candidate
    :class:`Instruction` (its text, the completion it came from, what earlier
    stages found; for turn 2..T of ``--turns T`` its ``turn`` and the
    conversation before it, ``history``) is returned, possibly changed, or
    rejected.  A rejection here costs no response tokens.
``on_answer(candidate, record)``
    Each turn, once its answer was generated: ``record`` is the conversation up
    to that answer (``record.messages[-1]``), returned, possibly changed (a
    guard's verdict), or rejected before the next turn costs anything.
``on_pair(candidate, record)``
    Once, after the last turn: the whole record (``candidate`` is turn 1's) is
    returned, possibly changed (tagged by a judge), or rejected.
``on_emit(result)``
    When the scheduler emits results, one at a time in index order, so what a
    stage decides here never depends on timing: a record or a rejection (a
    stage may release what it held for a rejected attempt) is returned, or a
    record is turned into a rejection.  ``revoke(record)`` undoes what
    ``on_emit`` did for a record that a later stage then rejected.

What a later turn (``candidate.turn`` > 1) means is each stage's own: cleaning,
reasoning and the rule filters check every user turn; the filters and the guard
every answer; dedup checks a follow-up against the conversation's own earlier
user turns (the record is deduplicated by its first); the judge tags the whole
conversation once, in ``on_pair``.  The scheduler names a rejection of turn N >
1 ``turnN_<reason>`` and attaches the conversation up to what was rejected.

``close()`` is called once when a run ends.  The scheduler runs its stages as
an onion: ``on_instruction`` in list order, ``on_answer``, ``on_pair`` and
``on_emit`` in reverse order (the last stage to pass an instruction is the
first to see its answer: a guard checks the instruction after the pre-judge,
and the response before the judge).  Every method is a no-op here; a stage
overrides the ones it needs.  Methods are ``async`` because some stages call a
model (judge, guard, the embeddings of semantic dedup); the others never
suspend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from magpie.backends.base import Completion, Sampling
from magpie.records import GuardVerdict, Message, Record, Rejection

if TYPE_CHECKING:
    from magpie.pipeline.stages.judge import InstructionVerdict


@dataclass
class Instruction:
    """The candidate of ``on_instruction``: a generated user turn (turn 1's
    instruction, or a follow-up question of ``--turns``)."""

    index: int
    text: str
    completion: Completion
    seed: int
    #: The pre-judge's verdict (``--prejudge``), set by the judge stage.
    verdict: InstructionVerdict | None = None
    sampling: Sampling | None = None
    #: Set when the text is choice ``choice`` of a request for ``n`` samples.
    n: int | None = None
    choice: int | None = None
    #: The pre-query template's own special strings (no text may hold them).
    forbidden: list[str] = field(default_factory=list)
    #: The guard's verdict on the instruction, set by the guard stage.
    guard: GuardVerdict | None = None
    #: Which user turn this is (1: the instruction; 2..T: follow-ups).
    turn: int = 1
    #: The conversation before this user turn (empty for turn 1).
    history: list[Message] = field(default_factory=list)


class Stage:
    """A pipeline stage: override the points it acts at (all no-ops here)."""

    #: A rejection by this stage in ``on_instruction`` counts a response not
    #: spent (``RunStats.saved_responses``); False for the checks that find no
    #: usable instruction at all (cleaning, reasoning markup).
    saves_response: bool = True

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        return candidate

    async def on_answer(self, candidate: Instruction, record: Record) -> Record | Rejection:
        return record

    async def on_pair(self, candidate: Instruction, record: Record) -> Record | Rejection:
        return record

    async def on_emit(self, result: Record | Rejection) -> Record | Rejection:
        return result

    def revoke(self, record: Record) -> None:
        """Undo ``on_emit`` for ``record``, rejected by a later stage at emit."""

    def close(self) -> None:
        """The run ended (release threads, pools)."""
