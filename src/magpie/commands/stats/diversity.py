"""How varied a dataset's instructions are (``magpie stats``, "Diversity").

- distinct-1 / distinct-2 (Li et al. 2016): distinct word unigrams / bigrams of
  all instructions over the number of unigrams / bigrams, lowercased words;
- openings: the first three words of each instruction, the most common ones
  and the share of the top one (Magpie data opens alike: "Can you help me...");
- spreads of the judge's task category, the persona and the topic drawn
  (``--personas``/``--topics``): how many distinct values, their Shannon
  entropy in bits and that entropy over its maximum (1.0: perfectly even);
- with an embedding model, the mean pairwise cosine distance of the
  instructions' embeddings (:func:`mean_cosine_distance`).

Memory: n-grams are kept as 64-bit hashes in arrays (8 bytes each), counted
with numpy at the end; 100,000 instructions of 20 words hold about 30 MB.
"""

from __future__ import annotations

import math
import random
import re
from array import array
from collections import Counter
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field

_WORD = re.compile(r"\w+(?:['’]\w+)*")
#: Openings and spread values listed by ``magpie stats``.
TOP = 10


def words(text: str) -> list[str]:
    """Lowercased words (letters, digits, inner apostrophes) of a text."""
    return _WORD.findall(text.lower())


def opening(text: str, n: int = 3) -> str:
    """The first ``n`` words of an instruction, lowercased."""
    return " ".join(words(text)[:n])


class Share(BaseModel):
    value: str
    count: int
    share: float


class Spread(BaseModel):
    """How evenly a field's values are spread over the records."""

    #: Records that have the field.
    count: int = 0
    distinct: int = 0
    entropy_bits: float | None = None
    #: entropy / log2(distinct): 1.0 is a perfectly even spread (None for one value).
    evenness: float | None = None
    top: list[Share] = Field(default_factory=list)


class DiversityStats(BaseModel):
    instructions: int = 0
    distinct_1: float | None = None
    distinct_2: float | None = None
    #: The most common first three words, with their share of the instructions.
    openings: list[Share] = Field(default_factory=list)
    top_opening_share: float | None = None
    distinct_openings: int = 0
    categories: Spread | None = None
    personas: Spread | None = None
    topics: Spread | None = None
    #: Mean pairwise cosine distance (1 - cosine similarity) of instruction
    #: embeddings; None unless an embedding model was given.
    mean_cosine_distance: float | None = None
    embedding_model: str | None = None
    #: Instructions the mean was taken over (a sample of at most EMBED_SAMPLE).
    embedded: int | None = None


def spread(counts: Counter[str]) -> Spread | None:
    total = sum(counts.values())
    if total == 0:
        return None
    entropy = -sum((n / total) * math.log2(n / total) for n in counts.values())
    distinct = len(counts)
    return Spread(
        count=total,
        distinct=distinct,
        entropy_bits=round(entropy, 4),
        evenness=round(entropy / math.log2(distinct), 4) if distinct > 1 else None,
        top=[Share(value=v, count=n, share=n / total) for v, n in counts.most_common(TOP)],
    )


class DiversityCounter:
    """Accumulates the diversity figures record by record."""

    def __init__(self, sample_size: int = 0) -> None:
        self.count = 0
        #: A reservoir sample of instructions for :func:`mean_cosine_distance`
        #: (kept only when ``sample_size`` > 0; seeded, so reproducible).
        self.sample: list[str] = []
        self._sample_size = sample_size
        self._rng = random.Random(0)
        self._grams: dict[int, array[int]] = {1: array("q"), 2: array("q")}
        self.openings: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.personas: Counter[str] = Counter()
        self.topics: Counter[str] = Counter()

    def add(
        self,
        instruction: str,
        *,
        category: str | None = None,
        persona: str | None = None,
        topic: str | None = None,
    ) -> None:
        self.count += 1
        if self._sample_size:
            if len(self.sample) < self._sample_size:
                self.sample.append(instruction)
            else:
                j = self._rng.randrange(self.count)
                if j < self._sample_size:
                    self.sample[j] = instruction
        ws = words(instruction)
        self._grams[1].extend(hash(w) for w in ws)
        self._grams[2].extend(hash((a, b)) for a, b in zip(ws, ws[1:], strict=False))
        self.openings[" ".join(ws[:3])] += 1
        for counter, value in (
            (self.categories, category),
            (self.personas, persona),
            (self.topics, topic),
        ):
            if isinstance(value, str) and value:
                counter[value] += 1

    def distinct(self, n: int) -> float | None:
        import numpy as np

        grams = self._grams[n]
        if not grams:
            return None
        return len(np.unique(np.frombuffer(grams, dtype=np.int64))) / len(grams)

    def result(self) -> DiversityStats:
        n = self.count
        top = self.openings.most_common(TOP)
        return DiversityStats(
            instructions=n,
            distinct_1=self.distinct(1),
            distinct_2=self.distinct(2),
            openings=[Share(value=v, count=c, share=c / n) for v, c in top],
            top_opening_share=top[0][1] / n if top else None,
            distinct_openings=len(self.openings),
            categories=spread(self.categories),
            personas=spread(self.personas),
            topics=spread(self.topics),
        )


#: Instructions embedded for the mean cosine distance: a reservoir sample of
#: this many beyond it (seeded: the same file gives the same sample).  The
#: standard error of a mean over 2,000 x 1,999 pairs is well below 0.01.
EMBED_SAMPLE = 2000


def mean_cosine_distance(
    texts: Sequence[str], embed: Callable[[list[str]], Sequence[Sequence[float]]]
) -> float | None:
    """The mean of 1 - cos(a, b) over all pairs of distinct texts' embeddings."""
    import numpy as np

    if len(texts) < 2:
        return None
    vectors = np.asarray(embed(list(texts)), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1.0, norms)
    # Sum over all pairs i != j of cos = |sum of unit vectors|^2 - n.
    total = unit.sum(axis=0)
    n = len(unit)
    cos_sum = float(total @ total) - float((unit * unit).sum())
    return 1.0 - cos_sum / (n * (n - 1))


def _spread_text(s: Spread | None) -> str:
    if s is None:
        return "–"
    even = "–" if s.evenness is None else f"{s.evenness:.2f}"
    return f"{s.distinct:,} distinct, entropy {s.entropy_bits:.2f} bits (evenness {even})"


def diversity_rows(d: DiversityStats) -> list[tuple[str, str]]:
    """The figures as (what, value) rows, shared by the terminal and HTML reports."""

    def num(v: float | None, digits: int = 3) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    top = d.openings[0].value if d.openings else ""
    rows = [
        ("distinct-1 (words)", num(d.distinct_1)),
        ("distinct-2 (word pairs)", num(d.distinct_2)),
        (
            "top opening (first 3 words)",
            f"{100 * d.top_opening_share:.1f}% “{top}”" if d.top_opening_share else "–",
        ),
        ("distinct openings", f"{d.distinct_openings:,}"),
        ("task categories (judge)", _spread_text(d.categories)),
        ("personas", _spread_text(d.personas)),
        ("topics", _spread_text(d.topics)),
    ]
    if d.mean_cosine_distance is not None:
        rows.append(
            (
                "mean pairwise cosine distance",
                f"{d.mean_cosine_distance:.3f} ({d.embedding_model}, {d.embedded:,} instructions)",
            )
        )
    else:
        rows.append(("mean pairwise cosine distance", "– (give --semantic-model)"))
    return rows
