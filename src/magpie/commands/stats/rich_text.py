"""``magpie stats`` as Rich tables on a terminal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

#: The judge's label sets, in their order (worst / easiest first).

from magpie.commands.stats.compute import NOT_JUDGED, DataStats, Throughput, fmt, pct, ratio
from magpie.commands.stats.diversity import diversity_rows

# ----------------------------------------------------------------------------- Rich


def _bar(n: int, top: int, width: int = 24) -> str:
    if top <= 0 or n <= 0:
        return ""
    return "█" * max(1, round(width * n / top))


def _overview_rows(stats: DataStats) -> list[tuple[str, str]]:
    t, tp = stats.tokens, stats.throughput
    rows = [
        ("records (kept)", fmt(stats.kept)),
        ("rejected", fmt(stats.rejected_total)),
        ("keep rate", pct(stats.keep_rate)),
        (
            "unique instructions",
            f"{fmt(stats.unique_instructions)} ({pct(stats.unique_share)})",
        ),
        ("duplicates rejected", fmt(stats.duplicates_rejected)),
        ("duplicate instructions in file", fmt(stats.duplicate_instructions)),
        ("tokens per kept pair", fmt(t.per_kept_pair, 1)),
        ("tokens (records / rejected work)", f"{fmt(t.records_total)} / {fmt(t.rejected_work)}"),
        ("records per second", fmt(tp.records_per_s, 3) if tp else "– (no manifest)"),
        ("turns", ", ".join(f"{k}: {v}" for k, v in stats.turns.items()) or "–"),
    ]
    if stats.invalid_lines:
        rows.append(("invalid lines (skipped)", fmt(stats.invalid_lines)))
    if stats.duplicate_ids:
        rows.append(("duplicate ids", fmt(stats.duplicate_ids)))
    return rows


def _counts_table(
    title: str, counts: Mapping[Any, int], total: int | None = None, *, zeros: bool = True
) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("value")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    total = total if total is not None else sum(counts.values())
    top = max(counts.values(), default=0)
    for key, n in counts.items():
        if n or zeros:
            table.add_row(str(key), fmt(n), pct(ratio(n, total)), _bar(n, top))
    return table


def _origin_table(stats: DataStats) -> Any:
    from rich.table import Table

    table = Table(title="Models, templates, backends", title_justify="left")
    for col in ("kind", "value", "records"):
        table.add_column(col, justify="right" if col == "records" else "left")
    for kind, counts in (
        ("model", stats.models),
        ("template", stats.templates),
        ("backend", stats.backends),
    ):
        for value, n in counts.items():
            table.add_row(kind, value, fmt(n))
    return table


def _length_table(stats: DataStats) -> Any:
    from rich.table import Table

    table = Table(title="Lengths", title_justify="left")
    for col in ("field", "unit", "min", "p50", "p90", "max", "mean"):
        table.add_column(col, justify="left" if col in ("field", "unit") else "right")
    for field, lengths in (
        ("instruction", stats.instruction_length),
        ("response", stats.response_length),
    ):
        for unit, d in (("chars", lengths.chars), ("words", lengths.words)):
            table.add_row(
                field, unit, fmt(d.min), fmt(d.p50), fmt(d.p90), fmt(d.max), fmt(d.mean, 1)
            )
    return table


def _runs_table(tp: Throughput) -> Any:
    from rich.table import Table

    table = Table(title="Runs (manifest)", title_justify="left")
    for col in ("started", "status", "written", "rejected", "wall s", "records/s", "tokens"):
        table.add_column(col, justify="left" if col in ("started", "status") else "right")
    for run in tp.runs:
        table.add_row(
            run.started_at,
            run.status,
            fmt(run.written),
            fmt(sum(run.rejected.values())),
            fmt(run.wall_s, 0),
            fmt(run.records_per_s, 3),
            fmt(run.tokens),
        )
    return table


def _judge_tables(stats: DataStats) -> list[Any]:
    j = stats.judge
    if not j.judged:
        return []
    tables = [
        _counts_table(f"Task categories ({j.status})", j.task_categories, j.judged, zeros=False),
        _counts_table(f"Input quality ({j.status})", j.input_quality, j.judged),
        _counts_table(f"Difficulty ({j.status})", j.difficulty, j.judged),
    ]
    if j.response_scored:
        title = f"Response score ({j.response_status}, mean {fmt(j.response_score_mean)})"
        tables.append(_counts_table(title, j.response_scores, j.response_scored))
    return tables


def render_rich(stats: DataStats, console: Console) -> None:
    """Print the statistics as Rich tables on ``console`` (the caller picks the stream)."""
    from rich.table import Table

    overview = Table(title=f"magpie stats: {stats.path}", title_justify="left", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for what, value in _overview_rows(stats):
        overview.add_row(what, value)
    console.print(overview)
    if stats.rejected:
        console.print(
            _counts_table("Rejected by reason", stats.rejected, stats.kept + stats.rejected_total)
        )
    console.print(_length_table(stats))
    tables = _judge_tables(stats)
    if not tables:
        console.print(f"Task categories, input quality, difficulty, response score: {NOT_JUDGED}")
    for table in tables:
        console.print(table)
    if stats.judge.judged and not stats.judge.response_scored:
        console.print(f"Response score: {NOT_JUDGED}")
    if stats.throughput is not None and stats.throughput.runs:
        console.print(_runs_table(stats.throughput))
    if stats.models or stats.templates or stats.backends:
        console.print(_origin_table(stats))
    for table in _diversity_tables(stats):
        console.print(table)


def _diversity_tables(stats: DataStats) -> list[Any]:
    from rich.table import Table

    d = stats.diversity
    if not d.instructions:
        return []
    table = Table(title="Diversity of instructions", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in diversity_rows(d):
        table.add_row(what, value)
    tables = [
        table,
        _counts_table(
            "Most common openings (first 3 words)",
            {s.value: s.count for s in d.openings},
            d.instructions,
        ),
    ]
    for title, spread in (("Personas", d.personas), ("Topics", d.topics)):
        if spread is not None:
            tables.append(
                _counts_table(
                    f"{title} (top {len(spread.top)} of {spread.distinct:,})",
                    {s.value: s.count for s in spread.top},
                    spread.count,
                )
            )
    return tables
