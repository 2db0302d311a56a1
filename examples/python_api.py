"""Use magpie as a library: the same pipeline the command runs.

python examples/python_api.py            # embedded SmolLM2, 3 pairs
python examples/python_api.py llama3.1   # an Ollama model
"""

from __future__ import annotations

import asyncio
import sys

from magpie import RunConfig, agenerate
from magpie.records import Record


async def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    config = RunConfig(
        num=3,
        output="api-example.jsonl",
        model=model,
        seed=7,
        instruction={"max_tokens": 128},
        response={"temperature": 0.0, "max_tokens": 256},
        keep_truncated=True,
    )

    def show(item, stats) -> None:  # type: ignore[no-untyped-def]
        if isinstance(item, Record):
            print(f"[{item.index}] {item.instruction[:70]!r}")
        else:
            print(f"[{item.index}] rejected: {item.reason}")

    result = await agenerate(config, on_result=show)
    print(result.stats.summary())


if __name__ == "__main__":
    asyncio.run(main())
