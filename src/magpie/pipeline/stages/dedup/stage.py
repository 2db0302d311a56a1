"""Dedup as a pipeline stage: a new instruction is checked against the records
already emitted before its response is requested, and each record is checked
and added again when it is emitted, in index order, so the decisions do not
depend on timing.

A record is deduplicated by its first user turn (its ``instruction``, what
the index holds), as the reference deduplicates its multi-turn sets.  A
follow-up question of ``--turns`` is not checked against the index: follow-ups
such as "Can you give an example?" recur across conversations that differ,
and rejecting a conversation because its second question resembles another's
first would throw away distinct records.  It is checked against the earlier
user turns of its own conversation instead (exact and near rules, no
embeddings): a model that asks its first question again makes a conversation
that goes in a circle (``turnN_duplicate``).

With semantic dedup the embeddings are awaited off the event loop's thread:
through the embed function's ``aembed`` when it has one
(:class:`magpie.pipeline.stages.dedup.embeddings.BackendEmbedder`), else the
plain function runs on a worker thread of the stage's own, one call at a time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from magpie.pipeline.stages.base import Instruction, Stage
from magpie.pipeline.stages.dedup.index import DedupIndex, Duplicate
from magpie.records import Record, Rejection


def _detail(dup: Duplicate) -> str:
    return f"{dup.kind} duplicate of {dup.of_id} ({dup.similarity:.2f})"


class Dedup(Stage):
    """Exact, near and semantic duplicates of the records emitted so far."""

    def __init__(self, index: DedupIndex) -> None:
        self.index = index
        #: Runs a plain (synchronous) embed function of the index off the loop.
        self._embed_pool: ThreadPoolExecutor | None = None

    async def on_instruction(self, candidate: Instruction) -> Instruction | Rejection:
        if candidate.turn > 1:
            return self._check_follow_up(candidate)
        dup = await self._check(candidate.text)
        if dup is None:
            return candidate
        return Rejection(
            index=candidate.index, reason="duplicate", text=candidate.text, detail=_detail(dup)
        )

    async def on_emit(self, result: Record | Rejection) -> Record | Rejection:
        if not isinstance(result, Record):
            return result
        index, text = self.index, result.instruction
        if not index.has_embedding(text) and index.check(text, semantic=False) is None:
            await self._ensure_embedding(text)  # it left the index's cache
        dup = index.check_and_add(result.id, text)
        if dup is None:
            return result
        return Rejection(
            index=result.index,
            reason="duplicate",
            stage="response",
            text=result.instruction,
            detail=_detail(dup),
            record=result,
        )

    def _check_follow_up(self, candidate: Instruction) -> Instruction | Rejection:
        """A follow-up question against the conversation's earlier user turns."""
        asked = [m.content for m in candidate.history if m.role == "user"]
        hit = self.index.repeats(candidate.text, asked)
        if hit is None:
            return candidate
        turn, kind, similarity = hit
        return Rejection(
            index=candidate.index,
            reason="duplicate",
            text=candidate.text,
            detail=f"{kind} duplicate of turn {turn + 1} ({similarity:.2f})",
        )

    def close(self) -> None:
        if self._embed_pool is not None:
            self._embed_pool.shutdown(wait=False)
            self._embed_pool = None

    async def _check(self, text: str) -> Duplicate | None:
        """Dedup of a new instruction against the records emitted so far.  With
        semantic dedup, an instruction that is no exact or near duplicate has
        its embedding awaited first (never computed on this event loop's
        thread) and handed to the index."""
        if self.index.embed is None:
            return self.index.check(text)
        dup = self.index.check(text, semantic=False)
        if dup is not None:
            return dup
        await self._ensure_embedding(text)
        return self.index.check(text)  # no await in between: the vector is still there

    async def _ensure_embedding(self, text: str) -> None:
        """Give the index the embedding of ``text`` unless it has it."""
        index = self.index
        if index.embed is None or index.has_embedding(text):
            return
        embed = index.embed
        aembed = getattr(embed, "aembed", None)
        if aembed is not None:
            vectors = await aembed([text])
        else:
            if self._embed_pool is None:
                self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="magpie-embed")
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._embed_pool, embed, [text])
        index.remember_embedding(text, vectors[0])
