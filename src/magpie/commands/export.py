"""Convert a magpie JSONL into the formats finetuning tools read.

* ``openai``: ``{"messages": [{"role", "content"}, ...]}`` (TRL SFTTrainer,
  OpenAI finetuning, Axolotl ``chat_template``).
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt", "value"}, ...]}``
  (Axolotl ``sharegpt``, LLaMA-Factory ``formatting: sharegpt``).
* ``alpaca``: ``{"instruction", "input", "output", "history"}`` (LLaMA-Factory
  ``alpaca``; ``history`` holds earlier turns of a multi-turn record, and
  ``system`` the system message of a conversation that has one).
* ``dpo``: ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``,
  TRL ``DPOTrainer``'s conversational preference format, from records made
  with ``--responses K --judge``; records without a preference (or whose best
  and worst answers scored the same) are skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from magpie.commands.publish.fields import MESSAGE_LISTS
from magpie.errors import UsageError
from magpie.records import Record
from magpie.store.atomic import AtomicOutput
from magpie.store.jsonl import read_records
from magpie.store.targets import STDIO, Targets, stdin_bytes

Format = Literal["openai", "sharegpt", "alpaca", "dpo"]
FORMATS: tuple[str, ...] = ("openai", "sharegpt", "alpaca", "dpo")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}

#: What of a record each format carries: the record fields it writes (its
#: conversation; the metadata stays in the magpie JSONL and the hf and sqlite
#: exports, which carry every field).  ``openai`` and ``dpo`` write whole
#: messages, so a new field of :class:`~magpie.records.Message` reaches them
#: by itself.
CARRIES: dict[str, frozenset[str]] = {
    "openai": frozenset({"messages"}),
    "sharegpt": frozenset({"messages"}),
    # ``instruction``/``response`` only for a record whose messages hold no pair.
    "alpaca": frozenset({"messages"}),
    # The prompt and the two answers: the conversations whole, less the
    # rejected one's prompt, which is the chosen one's.
    "dpo": frozenset({"chosen", "rejected", "score_chosen", "score_rejected"}),
}
#: The message fields a format has no place for (decided per format: a test
#: fails on a message field that neither reaches a format nor is named here).
_NO_PLACE_IN_MESSAGES: dict[str, frozenset[str]] = {
    "sharegpt": frozenset({"reasoning_content"}),  # {"from", "value"} only
    "alpaca": frozenset({"reasoning_content"}),  # instruction/output texts only
}


def _no_place(fmt: str) -> frozenset[str]:
    carried = CARRIES[fmt]
    return frozenset(Record.model_fields).difference(carried) | {
        f"{name}[].{field}"
        for name in MESSAGE_LISTS
        if name in carried
        for field in _NO_PLACE_IN_MESSAGES.get(fmt, ())
    }


#: What a format has no place for, derived from the record model: every field
#: of :class:`~magpie.records.Record` it does not carry (a field added to the
#: record is named here by itself), and the message fields of the
#: conversations it carries that it cannot hold (``messages[].reasoning_content``).
#: Keys a line holds beyond the model (written by a later magpie) have no place
#: in any of them either.  A test holds every format to this list: what is not
#: named here reaches the format.
NO_PLACE: dict[str, frozenset[str]] = {fmt: _no_place(fmt) for fmt in FORMATS}


#: Why a record has no DPO row (``skip_reason``), and what to do about it.
DPO_SKIPS = {
    "no_pair": "without a pair (made without --responses K and --judge)",
    "tie": "ties (the judge scored chosen and rejected the same)",
}


class ExportCount(int):
    """The rows written (an int), with the records skipped by reason."""

    skipped: Counter[str]

    def __new__(cls, written: int, skipped: Counter[str]) -> ExportCount:
        obj = super().__new__(cls, written)
        obj.skipped = skipped
        return obj

    def explain(self, fmt: str) -> str | None:
        """One line on the records that got no row (None when none was skipped)."""
        if not self.skipped:
            return None
        parts = [f"{n} {DPO_SKIPS.get(r, r)}" for r, n in self.skipped.most_common()]
        hint = ""
        if fmt == "dpo" and "tie" in self.skipped:
            hint = (
                "; sample more answers (--responses 4) or use a stronger --judge so that "
                "their scores differ"
            )
        elif fmt == "dpo":
            hint = "; generate with --responses 2 --judge MODEL"
        return f"{sum(self.skipped.values())} records skipped: {'; '.join(parts)}{hint}"


def skip_reason(record: Record, fmt: str) -> str | None:
    """Why ``record`` has no row in ``fmt`` (None: it has one)."""
    if fmt != "dpo":
        return None
    pair = record.preference()
    if pair is None:
        return "no_pair"
    return "tie" if pair.score_chosen == pair.score_rejected else None


def convert(record: Record, fmt: str) -> dict[str, Any] | None:
    """One record in the target format (None: the record has nothing for it)."""
    messages = [m.model_dump() for m in record.messages]
    if fmt == "dpo":
        pair = record.preference()
        chosen, rejected = record.chosen, record.rejected
        if skip_reason(record, fmt) is not None or pair is None or not chosen or not rejected:
            return None
        return {
            "prompt": [m.model_dump() for m in pair.prompt],
            # The answers as the record holds them (with their reasoning).
            "chosen": [chosen[-1].model_dump()],
            "rejected": [rejected[-1].model_dump()],
            "score_chosen": pair.score_chosen,
            "score_rejected": pair.score_rejected,
        }
    if fmt == "openai":
        return {"messages": messages}
    if fmt == "sharegpt":
        return {
            "conversations": [
                {"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages
            ]
        }
    if fmt == "alpaca":
        turns = [m for m in messages if m["role"] != "system"]
        pairs = [
            (turns[i]["content"], turns[i + 1]["content"])
            for i in range(0, len(turns) - 1, 2)
            if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant"
        ]
        if not pairs:
            pairs = [(record.instruction, record.response)]
        *history, (instruction, output) = pairs
        out: dict[str, Any] = {"instruction": instruction, "input": "", "output": output}
        out["history"] = [list(p) for p in history]
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:  # LLaMA-Factory's alpaca ``system`` column
            out["system"] = "\n\n".join(system)
        return out
    raise UsageError(f"unknown export format {fmt!r}; pick one of: {', '.join(FORMATS)}")


def export_file(src: str, fmt: str, dst: str, *, overwrite: bool = False) -> int:
    """Convert ``src`` (``-`` = stdin) into ``dst`` (``-`` = stdout).

    A file output is written to a temporary file and renamed into place only
    when every line converted: a bad input leaves no half-written output, and
    an existing output is never replaced without ``overwrite``, nor while
    another run writes it (its lock, exit 4).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; pick one of: {', '.join(FORMATS)}")
    targets = Targets(overwrite=overwrite)
    targets.read("input", src)
    targets.replace("output", dst)
    targets.check()
    if src == STDIO:
        stdin_bytes()  # a closed stdin fails now, before any output is made
        source: Path | str = STDIO
        name = "stdin"
    else:
        source = Path(src).expanduser()
        if not source.is_file():
            raise UsageError(
                f"input {source} not found"
                if not source.exists()
                else f"input {source} is not a file"
            )
        name = str(source)
    records = read_records(source, name)
    count = 0
    skipped: Counter[str] = Counter()

    def rows() -> Iterator[str]:
        nonlocal count
        for rec in records:
            row = convert(rec, fmt)
            if row is None:
                skipped[skip_reason(rec, fmt) or "empty"] += 1
                continue
            count += 1
            yield json.dumps(row, ensure_ascii=False) + "\n"

    try:
        with targets.claim(), AtomicOutput(targets["output"]) as out:
            for line in rows():
                out.write(line.encode("utf-8"))
        return ExportCount(count, skipped)
    finally:
        records.close()
