"""``magpie filter``: rule filters and the LLM judge over an existing JSONL
(every user turn and answer of a conversation, as ``generate`` checks them; a
conversation is judged whole).

Streams the input (never loads it whole), keeps up to ``concurrency`` records
in flight, writes kept records to the output in input order and rejected ones
to ``--rejects`` with their reason.  Resumable like ``generate``: records whose
id is already in the output or the rejects file are skipped, so an interrupted
filter run picks up where it stopped.  A record that already carries tags
from the same judge model is not judged again (re-filtering with other
thresholds costs no model calls).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from magpie.commands.generate import RunControl
from magpie.errors import UsageError
from magpie.pipeline.counters import RunStats
from magpie.pipeline.stages.clean import template_reason
from magpie.pipeline.stages.filters import build_answer_filters, build_filters, record_reason
from magpie.pipeline.stages.judge import Judge, JudgeInvalid
from magpie.records import Record
from magpie.settings import RunConfig
from magpie.store.jsonl import (
    JsonlWriter,
    RejectsWriter,
    check_run_targets,
    read_objects,
    read_records,
    run_targets,
    scan_output,
)
from magpie.templates.registry import known_special_tokens


@dataclass
class FilterResult:
    stats: RunStats
    skipped: int = 0
    judged: int = 0
    reused: int = 0


def _done_ids(path: Path | None) -> set[str]:
    """Ids in a rejects file (lines that carry an ``id``)."""
    if path is None or not path.exists():
        return set()
    return {
        rid
        for obj in read_objects(path)
        if obj is not None and isinstance(rid := obj.get("id"), str) and rid
    }


def _records(src: Path, skip: set[str], counter: list[int]) -> Iterator[Record]:
    for rec in read_records(src, str(src)):
        if rec.id in skip:
            counter[0] += 1
            continue
        yield rec


async def afilter(
    src: str | Path,
    config: RunConfig,
    *,
    on_result: Callable[[Record, str | None, RunStats], None] | None = None,
    control: RunControl | None = None,
) -> FilterResult:
    """Filter ``src`` into ``config.output`` (and ``config.rejects``)."""
    src_path = Path(src).expanduser()
    if not src_path.is_file():
        raise UsageError(
            f"input {src_path} not found"
            if not src_path.exists()
            else f"input {src_path} is not a file"
        )
    targets = run_targets(
        config.output, config.rejects, overwrite=config.overwrite, inputs=[("input", src_path)]
    )
    check_run_targets(targets)
    out, named_rejects = targets["output"].path, targets.get("--rejects")
    rejects_path = named_rejects.path if named_rejects is not None else None
    if out is None:
        raise UsageError("magpie filter needs a file --output (it resumes from it)")
    if config.judge and config.judge.strip().lower() == "same":
        raise UsageError("magpie filter needs a judge model name, not 'same'")
    config.check_prompt_texts()  # --judge-prompt
    filters = build_filters(config.filters)
    answer_filters = build_answer_filters(config.filters)
    with targets.claim():  # the output's and --rejects' locks
        existing = scan_output(out) if not config.overwrite else None
        skip = set(existing.ids) if existing else set()
        skip |= _done_ids(rejects_path) if not config.overwrite else set()
        stats = RunStats()
        stats.existing = len(skip)
        result = FilterResult(stats=stats)
        judge = None
        judge_backend = None
        if config.judge:
            from magpie.backends.registry import open_judge_backend

            judge_backend = await open_judge_backend(config.judge_spec, config.retry)
            judge = Judge(
                judge_backend,
                system_prompt=config.judge_prompt,
                retry=config.retry,
                on_retry=lambda cause: stats.retries.update([cause]),
            )
        thresholds = config.thresholds
        writer = JsonlWriter(out, overwrite=config.overwrite, existing=existing)
        rejects = RejectsWriter(rejects_path, afresh=config.overwrite) if rejects_path else None

        special = known_special_tokens()

        async def process(rec: Record) -> tuple[Record, str | None]:
            # Text that would forge a turn if rendered into a template (the
            # judge's, a finetuning script's) is never kept or judged.
            turn = 0
            for msg in rec.messages:
                if msg.role == "system":
                    continue  # the user's own prompt, not model text
                turn += msg.role == "user"
                leak = template_reason(msg.content, special)
                if leak is not None:
                    leak = leak if msg.role == "user" else f"response_{leak}"
                    return rec, leak if turn <= 1 else f"turn{turn}_{leak}"
            # Every user turn and every answer, as a run checks them.
            reason = record_reason(rec, filters, answer_filters)
            if reason is not None:
                return rec, reason
            if judge is None:
                return rec, None
            if rec.judge is not None and rec.judge.judge_model == judge.model:
                result.reused += 1
                tags = rec.judge
            else:
                try:
                    pair = await judge.judge_record(rec)  # a conversation: judged whole
                except JudgeInvalid:
                    return rec, "judge_invalid"
                result.judged += 1
                tags = judge.tags(pair)
                rec = rec.model_copy(update={"judge": tags})
            reason = thresholds.instruction_reason(tags) or thresholds.response_reason(tags)
            return rec, reason

        k = config.concurrency if isinstance(config.concurrency, int) else 4
        skipped = [0]
        window: deque[asyncio.Task[tuple[Record, str | None]]] = deque()

        def emit(rec: Record, reason: str | None) -> None:
            stats.attempts += 1
            if reason is None:
                writer.write(rec)
                stats.written += 1
            else:
                stats.rejected[reason] += 1
                if rejects is not None:
                    rejects.write(rec, reason=reason)
            if on_result is not None:
                on_result(rec, reason, stats)

        try:
            for rec in _records(src_path, skip, skipped):
                if control is not None and control.stopped:
                    break
                window.append(asyncio.ensure_future(process(rec)))
                if len(window) >= k:
                    emit(*(await window.popleft()))
            while window and not (control is not None and control.stopped):
                emit(*(await window.popleft()))
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)
            writer.close()
            if rejects is not None:
                rejects.close()
            if judge_backend is not None:
                await judge_backend.aclose()
        lock = targets["output"].lock
        assert lock is not None
        lock.keep()  # nothing kept is still an answer: an empty output
        result.skipped = skipped[0]
        return result
