"""Sample data shared by tests: a record, the judge's verdict, instruction texts."""

from __future__ import annotations

from typing import Any

from magpie.records import Message, Record, StageInfo, record_id, utcnow


def make_record(index: int, seed: int = 1, instruction: str = "Q?", response: str = "A.") -> Record:
    stage = StageInfo(temperature=1.0, top_p=1.0, max_tokens=8, seed=3, finish_reason="stop")
    return Record(
        id=record_id("m", "t", seed, index),
        index=index,
        instruction=instruction,
        response=response,
        messages=[
            Message(role="user", content=instruction),
            Message(role="assistant", content=response),
        ],
        model="m",
        backend="embedded",
        template="chatml",
        template_source="registry",
        instruction_generation=stage,
        response_generation=stage,
        seed=seed,
        created_at=utcnow(),
    )


def verdict(**over: Any) -> dict[str, Any]:
    v = {
        "input_quality": "good",
        "input_quality_explanation": "Clear.",
        "difficulty": "medium",
        "intent": "Wants a poem.",
        "knowledge": "Poetry.",
        "task_category": "Creative writing",
        "other_categories": [],
        "safety": "safe",
        "safety_reason": "",
        "language": "en",
        "response_score": 7,
        "response_reason": "Fine.",
    }
    v.update(over)
    return v


# 20 words; LONG_CHANGED swaps one of them.
LONG = (
    "Can you explain how photosynthesis works in plants and why it is important "
    "for the oxygen we breathe every day?"
)
LONG_CHANGED = LONG.replace("plants", "trees")
UNRELATED = [
    "Write a haiku about the first snow falling on a quiet mountain village.",
    "What are the main differences between TCP and UDP, and when should I use each?",
    "Give me a three-day itinerary for Lisbon on a student budget.",
    "How do I reverse a linked list in place in C?",
]
# Same template, different task: Jaccard of character 5-grams about 0.4.
SAME_TEMPLATE = (
    "Write a Python function that takes a list of integers and returns the sum of the even numbers.",
    "Write a Python function that takes a string and returns the number of vowels in it.",
)
