"""``magpie export --format hf``: a folder that ``datasets.load_dataset(DIR)``
loads as it is, and ``magpie card``.

::

    DIR/README.md                          the dataset card (configs, stats, provenance)
    DIR/data/train-00000-of-00002.parquet  the records, SHARD_RECORDS per shard
    DIR/rejects/train-00000-of-00001.parquet   with --rejects: the rejected attempts
    DIR/images/*.svg                       the charts of magpie stats

Everything streams: one pass for the statistics and the columns present, one
for the shards, written a batch at a time (memory flat in the records).  The
folder is built under a temporary name beside DIR and renamed into place
when complete, under DIR's lock; an existing DIR is replaced only with
``overwrite``, and only when it holds nothing but an earlier export
(:func:`foreign_in_export`): a folder with anything else in it is refused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from magpie.commands.publish.card import DEFAULT_LICENSE, CardConfig, CardInput, render_card
from magpie.commands.publish.card import languages_of as default_languages
from magpie.commands.publish.fields import has_reasoning
from magpie.commands.stats import DataStats, compute_stats
from magpie.commands.stats.svg import columns, hbars, standalone
from magpie.errors import UsageError
from magpie.store.atomic import AtomicFolder
from magpie.store.jsonl import read_objects, read_records
from magpie.store.manifest import Manifest, manifest_path, read_manifest
from magpie.store.targets import Targets

SHARD_RECORDS = 100_000
_BATCH = 1_000


@dataclass
class Scan:
    """What the first pass learned: the numbers, and the columns to write."""

    stats: DataStats
    manifest: Manifest | None
    records: int
    pairs: bool
    systems: Counter[str]
    #: Whether any message holds ``reasoning_content`` (else it is no column).
    reasoning: bool = False


def scan(src: Path, rejects: Path | None = None) -> Scan:
    """``magpie stats``'s numbers, and whether any record holds a pair."""
    if not src.is_file():
        raise UsageError(
            f"input {src} not found" if not src.exists() else f"input {src} is not a file"
        )
    if rejects is not None and not rejects.is_file():
        raise UsageError(f"--rejects {rejects} not found")
    stats = compute_stats(src, rejects=rejects)
    manifest = read_manifest(src) if manifest_path(src).is_file() else None
    pairs = reasoning = False
    n, systems = 0, Counter[str]()
    for rec in read_records(src):
        n += 1
        pairs = pairs or rec.chosen is not None
        reasoning = reasoning or has_reasoning(rec)
        if rec.system_name:
            systems[rec.system_name] += 1
    return Scan(stats, manifest, n, pairs, systems, reasoning)


def card_input(found: Scan, **options: Any) -> CardInput:
    languages = options.pop("languages", None) or default_languages(found.stats, found.manifest)
    return CardInput(
        stats=found.stats,
        manifest=found.manifest,
        languages=languages,
        pairs=found.pairs,
        reasoning=found.reasoning,
        systems=dict(found.systems.most_common()),
        **options,
    )


def card_text(
    src: Path | str,
    *,
    rejects: Path | str | None = None,
    license: str = DEFAULT_LICENSE,
    languages: list[str] | None = None,
    pretty_name: str | None = None,
) -> str:
    """``magpie card DATA``: the dataset card of a magpie JSONL."""
    found = scan(Path(src).expanduser(), Path(rejects).expanduser() if rejects else None)
    return render_card(
        card_input(found, license=license, languages=languages, pretty_name=pretty_name)
    )


def _charts(stats: DataStats) -> dict[str, tuple[str, str]]:
    """``{file name: (title, svg)}`` of the stats' distributions."""

    def hist(d: Any) -> list[tuple[str, float]]:
        return [(f"{b.lo}-{b.hi}", b.count) for b in d.buckets]

    charts = {
        "instruction_words.svg": (
            "Instruction length (words)",
            hist(stats.instruction_length.words),
        ),
        "response_words.svg": ("Response length (words)", hist(stats.response_length.words)),
    }
    out = {name: (title, columns(items)) for name, (title, items) in charts.items() if items}
    if stats.judge.task_categories:
        items = list(stats.judge.task_categories.items())
        out["task_categories.svg"] = ("Task categories", hbars(items))
    if stats.rejected:
        out["rejected.svg"] = ("Rejected by reason", hbars(list(stats.rejected.items())))
    return {name: (title, standalone(svg)) for name, (title, svg) in out.items()}


def _write_shards(
    folder: Path, rows: Iterable[dict[str, Any]], schema: Any, total: int, per_shard: int
) -> int:
    """Parquet shards ``folder/train-XXXXX-of-NNNNN.parquet``, a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    shards = max(1, -(-total // per_shard))
    written, writer, batch = 0, None, []

    def flush() -> None:
        nonlocal batch
        if batch:
            assert writer is not None
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch = []

    try:
        for row in rows:
            if written % per_shard == 0:
                flush()
                if writer is not None:
                    writer.close()
                name = f"train-{written // per_shard:05d}-of-{shards:05d}.parquet"
                writer = pq.ParquetWriter(folder / name, schema)
            batch.append(row)
            written += 1
            if len(batch) >= _BATCH:
                flush()
        flush()
        if writer is None:  # no rows: one empty shard keeps the config loadable
            writer = pq.ParquetWriter(folder / f"train-00000-of-{shards:05d}.parquet", schema)
    finally:
        if writer is not None:
            writer.close()
    return written


def _reject_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a rejects file (other lines are skipped)."""
    return (obj for obj in read_objects(path) if obj is not None)


@dataclass
class HfExport:
    path: Path
    records: int
    rejects: int
    shards: int


#: What an earlier ``export --format hf`` folder holds, and nothing else.
_OWN_FILES = {
    "data": re.compile(r"train-\d{5}-of-\d{5}\.parquet"),
    "rejects": re.compile(r"train-\d{5}-of-\d{5}\.parquet"),
    "images": re.compile(r"[a-z_]+\.svg"),
}


def foreign_in_export(folder: Path) -> str | None:
    """What in ``folder`` an earlier ``magpie export --format hf`` did not
    write (None: nothing, or the folder is empty): its dataset card
    ``README.md`` (tagged ``magpie``, listing ``configs``), its ``data/`` and
    ``rejects/`` Parquet shards and its ``images/`` charts are its own;
    anything else (notes, other data, a ``.git``) is not."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    for p in entries:
        if p.name == "README.md" and p.is_file() and not p.is_symlink():
            continue
        pattern = _OWN_FILES.get(p.name)
        if pattern is None or p.is_symlink() or not p.is_dir():
            return p.name
        for q in sorted(p.iterdir()):
            if q.is_symlink() or not q.is_file() or not pattern.fullmatch(q.name):
                return f"{p.name}/{q.name}"
    card = folder / "README.md"
    if not card.is_file():
        return "no README.md (an export writes its dataset card there)"
    if not _is_own_card(card.read_text("utf-8", errors="replace")):
        return "a README.md that is not a magpie export's dataset card"
    return None


def _is_own_card(text: str) -> bool:
    """A dataset card as :func:`export_hf` writes it: a YAML header tagged
    ``magpie`` that lists the folder's ``configs``."""
    if not text.startswith("---\n"):
        return False
    header = text[4:].split("\n---\n", 1)[0]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError:
        return False
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return isinstance(tags, list) and "magpie" in tags and "configs" in meta


def export_hf(
    src: Path | str,
    dst: Path | str,
    *,
    rejects: Path | str | None = None,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    languages: list[str] | None = None,
    pretty_name: str | None = None,
    shard_records: int = SHARD_RECORDS,
    on_pass: Callable[[str], None] | None = None,
) -> HfExport:
    """Write the folder ``dst`` from the magpie JSONL ``src`` (see the module doc)."""
    try:
        from magpie.commands.publish.columns import (
            record_row,
            record_schema,
            reject_row,
            rejects_schema,
        )
    except ImportError as exc:
        raise UsageError(f"--format hf needs pyarrow ({exc}): pip install 'magpie[hf]'") from None

    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    rej_p = Path(rejects).expanduser() if rejects else None
    targets = Targets(overwrite=overwrite)
    targets.read("input", src_p)
    targets.read("--rejects", rej_p)
    targets.folder("output", dst_p, foreign=foreign_in_export)
    targets.check()
    found = scan(src_p, rej_p)
    with targets.claim():
        folder = AtomicFolder(targets["output"])
        try:
            tmp = folder.tmp_path
            schema = record_schema(found.pairs, found.reasoning)
            rows = (record_row(r) for r in read_records(src_p))
            n = _write_shards(tmp / "data", rows, schema, found.records, shard_records)
            configs = [CardConfig("default", "data/train-*.parquet")]
            n_rej = 0
            if rej_p is not None:
                lines = sum(1 for _ in _reject_lines(rej_p))
                rows = (reject_row(line) for line in _reject_lines(rej_p))
                n_rej = _write_shards(tmp / "rejects", rows, rejects_schema(), lines, shard_records)
                configs.append(CardConfig("rejects", "rejects/train-*.parquet"))
            charts = _charts(found.stats)
            for name, (_, svg) in charts.items():
                folder.add_file(f"images/{name}", svg)
            card = card_input(
                found,
                license=license,
                languages=languages,
                pretty_name=pretty_name,
                configs=configs,
                images=[(title, f"images/{name}") for name, (title, _) in charts.items()],
            )
            folder.add_file("README.md", render_card(card))
            folder.commit()
        finally:
            folder.abort()
    shards = len(list((dst_p / "data").glob("*.parquet")))
    return HfExport(dst_p, n, n_rej, shards)
