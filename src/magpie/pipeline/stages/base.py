"""The one protocol of a pipeline stage, and the candidate it is handed.

A stage sees an attempt at three points, each explicit because the work there
differs:

``on_instruction(candidate)``
    Before the response is generated: the candidate :class:`Instruction` (its
    text, the completion it came from, what earlier stages found) is returned,
    possibly changed, or rejected.  A rejection here costs no response tokens.
``on_pair(candidate, record)``
    After the response (and the follow-up turns) was generated: the record is
    returned, possibly changed (tagged by a judge, a guard), or rejected.
``on_emit(result)``
    When the scheduler emits results, one at a time in index order, so what a
    stage decides here never depends on timing: a record or a rejection (a
    stage may release what it held for a rejected attempt) is returned, or a
    record is turned into a rejection.  ``revoke(record)`` undoes what
    ``on_emit`` did for a record that a later stage then rejected.

``close()`` is called once when a run ends.  The scheduler runs its stages as
an onion: ``on_instruction`` in list order, ``on_pair`` and ``on_emit`` in
reverse order (the last stage to pass an instruction is the first to see its
pair: a guard checks the instruction after the pre-judge, and the response
before the judge).  Every method is a no-op here; a stage overrides the ones it
needs.  Methods are ``async`` because some stages call a model (judge, guard,
the embeddings of semantic dedup); the others never suspend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from magpie.backends.base import Completion, Sampling
from magpie.records import GuardVerdict, Record, Rejection

if TYPE_CHECKING:
    from magpie.pipeline.stages.judge import InstructionVerdict


@dataclass
class Instruction:
    """The candidate of ``on_instruction``: a generated turn-1 instruction."""

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


class Stage:
    """A pipeline stage: override the points it acts at (all no-ops here)."""

    #: A rejection by this stage in ``on_instruction`` counts a response not
    #: spent (``RunStats.saved_responses``); False for the checks that find no
    #: usable instruction at all (cleaning, reasoning markup).
    saves_response: bool = True

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        return candidate

    async def on_pair(self, candidate: Instruction, record: Record) -> Record | Rejection:
        return record

    async def on_emit(self, result: Record | Rejection) -> Record | Rejection:
        return result

    def revoke(self, record: Record) -> None:
        """Undo ``on_emit`` for ``record``, rejected by a later stage at emit."""

    def close(self) -> None:
        """The run ended (release threads, pools)."""
