"""The dataset card (``README.md``): YAML metadata in the Hub's schema, then
how the data was made (from the manifest) and what it holds (``magpie stats``).

``magpie card DATA`` prints it; ``magpie export --format hf`` writes it beside
the Parquet shards.  The metadata validates with ``huggingface_hub``'s
``DatasetCard``; it is written with PyYAML, so that making a card needs no
Hub library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from magpie.commands.publish.fields import field_docs
from magpie.commands.stats import DataStats
from magpie.commands.stats.compute import Distribution, fmt, pct
from magpie.commands.stats.diversity import diversity_rows
from magpie.store.manifest import Manifest

#: The license until the user picks one: the Hub's "unknown", and the card says why.
DEFAULT_LICENSE = "unknown"
CITATION = """@article{xu2024magpie,
  title   = {Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing},
  author  = {Zhangchen Xu and Fengqing Jiang and Luyao Niu and Yuntian Deng and
             Radha Poovendran and Yejin Choi and Bill Yuchen Lin},
  journal = {arXiv preprint arXiv:2406.08464},
  year    = {2024}
}"""
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"))
_SIZES += ((1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"))


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` records."""
    for limit, name in _SIZES:
        if n < limit:
            return name
    return "10M<n<100M"


@dataclass
class CardConfig:
    """A data config of the card: its name and the files of its train split."""

    name: str
    path: str


@dataclass
class CardInput:
    """What the card is made of."""

    stats: DataStats
    manifest: Manifest | None
    license: str = DEFAULT_LICENSE
    languages: Sequence[str] = ()
    pretty_name: str | None = None
    #: The Parquet configs (``export --format hf``); empty for a JSONL card.
    configs: Sequence[CardConfig] = ()
    #: Chart images beside the card: ``(title, relative path)``.
    images: Sequence[tuple[str, str]] = ()
    pairs: bool = False
    #: Whether some message holds ``reasoning_content`` (else it is no column).
    reasoning: bool = False
    systems: Mapping[str, int] = field(default_factory=dict)


def languages_of(stats: DataStats, manifest: Manifest | None) -> list[str]:
    """The languages the judge found, else the ``--language`` filter of the run."""
    found = [code for code in stats.judge.languages if len(code) in (2, 3) and code.isalpha()]
    if found:
        return sorted(found)
    filters = (manifest.settings.get("filters") if manifest else None) or {}
    lang = filters.get("language") if isinstance(filters, dict) else None
    return [lang] if isinstance(lang, str) and lang else []


def metadata(card: CardInput) -> dict[str, Any]:
    """The YAML header (the Hub's ``DatasetCardData`` fields)."""
    meta: dict[str, Any] = {"license": card.license}
    if card.languages:
        meta["language"] = list(card.languages)
    if card.pretty_name:
        meta["pretty_name"] = card.pretty_name
    meta["size_categories"] = [size_category(card.stats.kept)]
    meta["task_categories"] = ["text-generation"]
    tags = ["synthetic", "magpie", "instruction-tuning", "sft"]
    meta["tags"] = tags + (["dpo", "preference"] if card.pairs else [])
    if card.configs:
        meta["configs"] = [
            {"config_name": c.name, "data_files": [{"split": "train", "path": c.path}]}
            for c in card.configs
        ]
    return meta


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _counts(title: str, counts: Mapping[Any, int], total: int, what: str = "records") -> str:
    rows = [(k, f"{n:,}", pct(n / total if total else None)) for k, n in counts.items()]
    return f"### {title}\n\n" + _table(("value", what, "share"), rows)


def _dist(name: str, d: Distribution) -> list[object]:
    return [name, fmt(d.min), fmt(d.p50), fmt(d.p90), fmt(d.max), fmt(d.mean, 1)]


def _sampling(stage: Mapping[str, Any] | None) -> str:
    """A stage's sampling as recorded: every setting the manifest holds for it
    (the run's Sampling, whatever its fields), but those left unset."""
    if not isinstance(stage, Mapping) or not stage:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in stage.items() if v is not None)


def _filters(filters: object) -> str:
    """The rule filters of the run, as set (``key value``, every one recorded)."""
    if not isinstance(filters, Mapping) or not filters:
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in filters.items() if v is not None) or "none"


def _judge_name(judge: object) -> str:
    if not judge:
        return "none"
    return "the generator itself (`same`)" if judge == "same" else f"`{judge}`"


def _provenance(card: CardInput) -> str:
    man = card.manifest
    if man is None:
        return (
            "No manifest was found beside the data (`DATA.manifest.json`), so how it was "
            "generated is not recorded here; the records name their model and template."
        )
    s = man.settings
    template = man.template or {}
    pre_query = template.get("text")
    judge = s.get("judge")
    thresholds = {k: v for k, v in (s.get("thresholds") or {}).items() if v not in (None, False)}
    dedup = "off"
    if s.get("dedup"):
        dedup = f"MinHash near-duplicates at Jaccard {s.get('dedup_threshold')}"
        if s.get("semantic_model"):
            dedup += (
                f"; semantic with {s['semantic_model']} at cosine {s.get('semantic_threshold')}"
            )
    rows: list[tuple[str, object]] = [
        ("generator model", f"`{man.model}`" if man.model else "mixed (a merge of runs)"),
        ("model digest", f"`{man.model_digest}`" if man.model_digest else "not recorded"),
        ("backend", f"{man.backend or 'mixed'}"),
        (
            "template",
            f"`{template.get('name')}` ({template.get('source')})" if template else "mixed",
        ),
        ("system prompt", repr(template.get("system")) if template.get("system") else "none"),
        ("instruction sampling", _sampling(s.get("instruction"))),
        ("response sampling", _sampling(s.get("response"))),
        ("turns", s.get("turns", 1)),
        ("answers per instruction", s.get("responses", 1)),
        ("judge", _judge_name(judge)),
        ("judge thresholds", ", ".join(f"{k} {v}" for k, v in thresholds.items()) or "none"),
        ("rule filters", _filters(s.get("filters"))),
        ("dedup", dedup),
        ("run seed", man.seed),
        ("magpie version", man.magpie_version),
    ]
    if s.get("system_preset"):
        rows.insert(5, ("system preset", s["system_preset"]))
    if card.systems:
        rows.insert(
            5, ("system prompt set", ", ".join(f"{k} ({n:,})" for k, n in card.systems.items()))
        )
    for kind in ("topics", "personas"):
        lst = s.get(kind)
        if isinstance(lst, dict):
            rows.insert(
                5,
                (
                    kind,
                    f"{lst.get('source')} ({lst.get('count')} items, sha256 "
                    f"{str(lst.get('sha256'))[:12]}), one drawn per record into the system "
                    f"prompt through {lst.get('template')!r}",
                ),
            )
    if isinstance(s.get("balance"), dict):
        b = s["balance"]
        cats = ", ".join(b.get("categories") or []) or "all twelve"
        rows.append(("category balance", f"even over {cats} (tolerance {b.get('tolerance')})"))
    text = _table(("", ""), rows)
    if pre_query:
        text += "\n\nThe pre-query template (the raw prompt that makes the model write an instruction):\n\n"
        text += "```\n" + str(pre_query) + "\n```"
    return text


def render_card(card: CardInput) -> str:
    """The whole ``README.md``."""
    st, man = card.stats, card.manifest
    meta = yaml.safe_dump(metadata(card), sort_keys=False, allow_unicode=True)
    name = card.pretty_name or (
        f"Magpie data from {man.model}" if man and man.model else "Magpie data"
    )
    total = st.kept + st.rejected_total
    parts = [
        f"---\n{meta}---",
        f"# {name}",
        f"Instruction/response pairs made with [magpie](https://arxiv.org/abs/2406.08464)'s "
        f"method: the model is given only the start of a user turn (the pre-query template), "
        f"writes an instruction, then answers it.  {st.kept:,} records"
        + (
            f", {st.rejected_total:,} attempts rejected (keep rate {pct(st.keep_rate)})."
            if total
            else "."
        ),
        "## License\n\n"
        + (
            "**The license is not set** (`license: unknown`): choose one before publishing "
            "(`magpie card --license ...` or edit the header). "
            if card.license == DEFAULT_LICENSE
            else f"Released under `{card.license}`. "
        )
        + "The data was written by the generator model below: its license and terms of use "
        "apply to these outputs too.",
        "## How it was made\n\n" + _provenance(card),
        "## Records\n\n"
        + _table(
            ("", ""),
            [
                ("records", f"{st.kept:,}"),
                ("rejected attempts", f"{st.rejected_total:,}"),
                ("keep rate", pct(st.keep_rate)),
                ("unique instructions", f"{st.unique_instructions:,} ({pct(st.unique_share)})"),
                ("tokens per kept pair", fmt(st.tokens.per_kept_pair, 1)),
            ],
        ),
    ]
    if st.rejected:
        parts.append(_counts("Rejected by reason", st.rejected, total, "attempts"))
    parts.append(
        "### Lengths\n\n"
        + _table(
            ("field", "min", "p50", "p90", "max", "mean"),
            [
                _dist("instruction (words)", st.instruction_length.words),
                _dist("instruction (chars)", st.instruction_length.chars),
                _dist("response (words)", st.response_length.words),
                _dist("response (chars)", st.response_length.chars),
            ],
        )
    )
    j = st.judge
    if j.judged:
        for title, counts in (
            ("Input quality", j.input_quality),
            ("Difficulty", j.difficulty),
            ("Task category", j.task_categories),
            ("Response score", j.response_scores),
            ("Safety", j.safety),
        ):
            if counts:
                parts.append(_counts(title, counts, j.judged))
    if st.diversity.instructions:
        parts.append(
            "### Diversity of instructions\n\n"
            + _table(
                ("", ""), [r for r in diversity_rows(st.diversity) if not r[1].startswith("– (")]
            )
        )
    if card.images:
        parts.append("### Charts\n\n" + "\n\n".join(f"![{t}]({p})" for t, p in card.images))
    parts.append(_fields(card))
    parts.append(_usage(card))
    parts.append(
        "## Known limitations\n\n"
        "- Synthetic data: instructions and answers were written by one model and can be "
        "wrong, biased or unsafe; nobody reviewed them.\n"
        "- The judge's tags (if any) come from a model too, and its scores are noisy.\n"
        "- Instructions follow what the generator tends to be asked; the topic mix is "
        "the model's, not the world's (see the task categories).\n"
        "- Near-duplicates are removed only as far as the dedup settings above reach."
    )
    parts.append("## Citation\n\n```bibtex\n" + CITATION + "\n```")
    return "\n\n".join(parts) + "\n"


def _fields(card: CardInput) -> str:
    """The columns (a Parquet export) or keys (a JSONL file) of a record, with
    their types and meanings, derived from the record model."""
    parquet = bool(card.configs)
    rows = [
        (f"`{name}`", kind, doc.replace("|", "\\|"))
        for name, kind, doc in field_docs(card.pairs, card.reasoning, parquet=parquet)
    ]
    text = "## Fields\n\n" + (
        "The Parquet columns of a record:"
        if parquet
        else "The keys of a record (one JSON object a line):"
    )
    text += "\n\n" + _table(("field", "type", "meaning"), rows)
    if any(c.name == "rejects" for c in card.configs):
        text += (
            "\n\nThe `rejects` config: `index`, then why (`reason`, `stage`, `detail`), "
            "then the columns above (filled for a pair rejected after its answer; an "
            "earlier rejection has its instruction, and its other keys in `extra_fields`)."
        )
    return text


def _usage(card: CardInput) -> str:
    text = (
        "## Use\n\n```python\nfrom datasets import load_dataset\n"
        'ds = load_dataset("REPO", split="train")   # or the folder itself\n```\n\n'
        "`messages` is TRL's conversational format (`SFTTrainer` takes the records as they are)"
    )
    if card.pairs:
        text += "; `chosen`/`rejected` (with `score_chosen`/`score_rejected`) are a preference pair for `DPOTrainer`"
    if any(c.name == "rejects" for c in card.configs):
        text += (
            '. The rejected attempts are the `rejects` config: `load_dataset("REPO", "rejects")`'
        )
    return text + "."
