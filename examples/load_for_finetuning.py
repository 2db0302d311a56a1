"""Load magpie output for finetuning, straight from a pipe or a file.

    magpie generate -n 100 -o - | python examples/load_for_finetuning.py
    python examples/load_for_finetuning.py data.jsonl

Each magpie record carries ``messages`` in the OpenAI/TRL conversational format,
so Hugging Face ``datasets`` and TRL's ``SFTTrainer`` take it as it is.  This
script keeps what an SFT run needs, filters truncated pairs, and prints a
summary; with ``datasets`` installed it also builds a ``Dataset``.
"""

from __future__ import annotations

import json
import sys


def read_pairs(stream):  # type: ignore[no-untyped-def]
    for line in stream:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["response_generation"]["finish_reason"] == "length":
            continue  # cut by the token limit: not a full answer
        yield {"messages": rec["messages"], "id": rec["id"]}


def main() -> int:
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as fh:
            rows = list(read_pairs(fh))
    else:
        rows = list(read_pairs(sys.stdin))
    print(f"{len(rows)} conversations", file=sys.stderr)
    try:
        from datasets import Dataset
    except ImportError:
        print("(pip install datasets to build a Dataset)", file=sys.stderr)
        return 0
    ds = Dataset.from_list(rows)
    print(ds, file=sys.stderr)
    # trl.SFTTrainer(model=..., train_dataset=ds) uses the "messages" column
    # with the model's chat template.
    return 0


if __name__ == "__main__":
    sys.exit(main())
