"""``--guard`` on the real Ollama.  No Llama Guard model can be made here (no
hub), so the real server checks the path with a model that is no guard:
SmolLM2's reply to a classification request is no verdict, and the pair must
be rejected as ``guard_invalid`` with the reply, never kept without a verdict.
The verdict format itself is covered against the double (tests/pipeline/test_guard.py)."""

from __future__ import annotations

import asyncio

from real_servers import RealOllama

from magpie.backends.ollama import OllamaBackend
from magpie.pipeline.stages.guard import Guard
from magpie.records import Rejection


def test_a_model_that_is_no_guard_gives_guard_invalid(ollama: RealOllama) -> None:
    async def check():  # type: ignore[no-untyped-def]
        async with OllamaBackend("smollm2", ollama.url) as b:
            return await Guard(b).check_instruction(0, "How do I bake bread?", True)

    result = asyncio.run(check())
    assert isinstance(result, Rejection), result
    assert result.reason == "guard_invalid" and result.stage == "guard"
    assert "reply:" in result.detail and "no verdict" in result.detail
