"""Convert a magpie JSONL into the formats finetuning tools read.

* ``openai``: ``{"messages": [{"role", "content"}, ...]}`` (TRL SFTTrainer,
  OpenAI finetuning, Axolotl ``chat_template``).
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt", "value"}, ...]}``
  (Axolotl ``sharegpt``, LLaMA-Factory ``formatting: sharegpt``).
* ``alpaca``: ``{"instruction", "input", "output", "history"}`` (LLaMA-Factory
  ``alpaca``; ``history`` holds earlier turns of a multi-turn record).
* ``dpo``: ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``,
  TRL ``DPOTrainer``'s conversational preference format, from records made
  with ``--responses K --judge``; records without a preference (or whose best
  and worst answers scored the same) are skipped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from magpie.atomic import AtomicFile
from magpie.errors import UsageError
from magpie.records import Record

Format = Literal["openai", "sharegpt", "alpaca", "dpo"]
FORMATS: tuple[str, ...] = ("openai", "sharegpt", "alpaca", "dpo")
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def convert(record: Record, fmt: str) -> dict[str, Any] | None:
    """One record in the target format (None: the record has nothing for it)."""
    messages = [m.model_dump() for m in record.messages]
    if fmt == "dpo":
        chosen, rejected = record.chosen, record.rejected
        if chosen is None or rejected is None or chosen.score == rejected.score:
            return None
        return {
            "prompt": [{"role": "user", "content": record.instruction}],
            "chosen": [{"role": "assistant", "content": chosen.content}],
            "rejected": [{"role": "assistant", "content": rejected.content}],
            "score_chosen": chosen.score,
            "score_rejected": rejected.score,
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
        return out
    raise UsageError(f"unknown export format {fmt!r}; pick one of: {', '.join(FORMATS)}")


def read_records(lines: Iterable[str], name: str) -> Iterator[Record]:
    """Parse magpie records from JSONL lines; a bad line is a UsageError."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield Record.model_validate_json(line)
        except (ValidationError, ValueError) as exc:
            if isinstance(exc, ValidationError):
                err = exc.errors()[0]
                detail = f"{'.'.join(str(x) for x in err['loc']) or 'record'}: {err['msg']}"
            else:
                detail = str(exc).splitlines()[0]
            raise UsageError(f"{name} line {lineno} is not a magpie record ({detail})") from None


def export_file(src: str, fmt: str, dst: str, *, overwrite: bool = False) -> int:
    """Convert ``src`` (``-`` = stdin) into ``dst`` (``-`` = stdout).

    A file output is written to a temporary file and renamed into place only
    when every line converted: a bad input leaves no half-written output, and
    an existing output is never replaced without ``overwrite``.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; pick one of: {', '.join(FORMATS)}")
    out_path = None if dst == "-" else Path(dst).expanduser()
    if out_path is not None:
        if out_path.is_dir():
            raise UsageError(f"output {out_path} is a directory")
        if out_path.exists() and not overwrite:
            raise UsageError(f"output {out_path} exists: pass --overwrite to replace it")
        if not out_path.parent.exists():
            raise UsageError(f"output directory {out_path.parent} does not exist")
    if src == "-":
        fh = sys.stdin
        name = "stdin"
    else:
        p = Path(src).expanduser()
        if not p.is_file():
            raise UsageError(
                f"input {p} not found" if not p.exists() else f"input {p} is not a file"
            )
        fh = p.open(encoding="utf-8")
        name = str(p)
    count = 0
    try:
        if out_path is None:
            for rec in read_records(fh, name):
                row = convert(rec, fmt)
                if row is not None:
                    sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
            sys.stdout.flush()
            return count
        with AtomicFile(out_path, text=True) as out:
            for rec in read_records(fh, name):
                row = convert(rec, fmt)
                if row is not None:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
        return count
    finally:
        if fh is not sys.stdin:
            fh.close()
