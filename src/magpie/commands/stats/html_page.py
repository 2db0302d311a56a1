"""``magpie stats --html``: one self-contained page with SVG charts."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from magpie.commands.stats.compute import (
    NOT_JUDGED,
    DataStats,
    Distribution,
    Throughput,
    fmt,
    pct,
)
from magpie.commands.stats.diversity import diversity_rows
from magpie.commands.stats.svg import COLORS, columns, hbars
from magpie.store.atomic import AtomicOutput
from magpie.store.targets import Targets

# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1f2933;background:#fafbfc}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin:2rem 0 .6rem}
.sub{color:#616e7c;margin-top:0}.cards{display:flex;flex-wrap:wrap;gap:.8rem}
.card{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:.7rem 1rem;min-width:150px}
.card .v{font-size:1.5rem;font-weight:600}.card .k{color:#616e7c;font-size:.85rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
.panel{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:.8rem 1rem}
.panel h3{font-size:1rem;margin:.1rem 0 .5rem}table{border-collapse:collapse;width:100%}
td,th{padding:.25rem .5rem;border-bottom:1px solid #eef0f2;text-align:right}
td:first-child,th:first-child{text-align:left}.muted{color:#9aa5b1}
svg text{font:12px system-ui,sans-serif;fill:#323f4b}svg .n{fill:#616e7c}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _hist_items(d: Distribution) -> list[tuple[str, int]]:
    return [(str(b.lo) if b.hi - b.lo == 1 else f"{b.lo}–{b.hi - 1}", b.count) for b in d.buckets]


def _panel(title: str, body: str) -> str:
    return f'<div class="panel"><h3>{_e(title)}</h3>{body}</div>'


def _cards(stats: DataStats) -> str:
    tp = stats.throughput
    cards = [
        ("records kept", fmt(stats.kept)),
        ("rejected", fmt(stats.rejected_total)),
        ("keep rate", pct(stats.keep_rate)),
        ("unique instructions", pct(stats.unique_share)),
        ("duplicates rejected", fmt(stats.duplicates_rejected)),
        ("tokens / kept pair", fmt(stats.tokens.per_kept_pair, 1)),
        ("records / s", fmt(tp.records_per_s, 3) if tp else "–"),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )


def _length_html(stats: DataStats) -> str:
    rows = []
    for field, lengths in (
        ("instruction", stats.instruction_length),
        ("response", stats.response_length),
    ):
        for unit, d in (("chars", lengths.chars), ("words", lengths.words)):
            cells = "".join(
                f"<td>{_e(fmt(v, 1))}</td>" for v in (d.min, d.p50, d.p90, d.max, d.mean)
            )
            rows.append(f"<tr><td>{field} {unit}</td>{cells}</tr>")
    table = (
        "<table><tr><th></th><th>min</th><th>p50</th><th>p90</th><th>max</th><th>mean</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    charts = [
        _panel(
            f"{field.capitalize()} length ({unit})",
            columns(_hist_items(getattr(lengths, unit)), color),
        )
        for field, lengths, color in (
            ("instruction", stats.instruction_length, COLORS[0]),
            ("response", stats.response_length, COLORS[1]),
        )
        for unit in ("chars", "words")
    ]
    return _panel("Length percentiles", table) + '<div class="grid">' + "".join(charts) + "</div>"


def _judge_html(stats: DataStats) -> str:
    j = stats.judge
    if not j.judged:
        return f'<p class="muted">Task categories, input quality, difficulty, response score: {NOT_JUDGED}.</p>'
    panels = [
        _panel(
            f"Task categories ({j.status})",
            hbars(list(j.task_categories.items()), COLORS[4]),
        ),
        _panel(f"Input quality ({j.status})", columns(list(j.input_quality.items()), COLORS[1])),
        _panel(f"Difficulty ({j.status})", columns(list(j.difficulty.items()), COLORS[2])),
    ]
    if j.response_scored:
        title = f"Response score ({j.response_status}, mean {fmt(j.response_score_mean)})"
        items = [(str(k), v) for k, v in j.response_scores.items()]
        panels.append(_panel(title, columns(items, COLORS[5])))
    else:
        panels.append(_panel("Response score", f'<p class="muted">{NOT_JUDGED}</p>'))
    return '<div class="grid">' + "".join(panels) + "</div>"


def _runs_html(tp: Throughput | None) -> str:
    if tp is None or not tp.runs:
        return '<p class="muted">no manifest next to the file: no run history.</p>'
    when = [r.started_at[5:16].replace("T", " ") for r in tp.runs]  # MM-DD HH:MM
    written = [(w, r.written) for w, r in zip(when, tp.runs, strict=True)]
    rates = [(w, r.records_per_s or 0.0) for w, r in zip(when, tp.runs, strict=True)]
    rows = "".join(
        f"<tr><td>{_e(r.started_at)}</td><td>{_e(r.status)}</td><td>{r.written:,}</td>"
        f"<td>{sum(r.rejected.values()):,}</td><td>{_e(fmt(r.wall_s, 0))}</td>"
        f"<td>{_e(fmt(r.records_per_s, 3))}</td><td>{r.tokens:,}</td></tr>"
        for r in tp.runs
    )
    table = (
        "<table><tr><th>started</th><th>status</th><th>written</th><th>rejected</th>"
        f"<th>wall s</th><th>records/s</th><th>tokens</th></tr>{rows}</table>"
    )
    return (
        '<div class="grid">'
        + _panel("Records written per run", columns(written, COLORS[0]))
        + _panel(
            f"Records per second per run (overall {fmt(tp.records_per_s, 3)})",
            columns(rates, COLORS[2], fmt=_rate_label),
        )
        + "</div>"
        + _panel("Runs", table)
    )


def _rate_label(value: float) -> str:
    return f"{value:.3g}"


def _counts_html(title: str, counts: Mapping[str, int]) -> str:
    return _panel(title, hbars(list(counts.items()), COLORS[3]))


def _diversity_html(stats: DataStats) -> str:
    d = stats.diversity
    if not d.instructions:
        return '<p class="muted">no instructions.</p>'
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in diversity_rows(d))
    panels = [
        _panel("Diversity", f"<table>{rows}</table>"),
        _panel(
            "Most common openings (first 3 words)",
            hbars([(s.value, s.count) for s in d.openings], COLORS[2]),
        ),
    ]
    for title, spread in (("Personas", d.personas), ("Topics", d.topics)):
        if spread is not None:
            panels.append(
                _panel(
                    f"{title} (top {len(spread.top)} of {spread.distinct:,})",
                    hbars([(s.value, s.count) for s in spread.top], COLORS[4]),
                )
            )
    return '<div class="grid">' + "".join(panels) + "</div>"


def render_html(stats: DataStats) -> str:
    """The whole report as one HTML document: inline CSS and SVG, no scripts, no links."""
    m = stats.manifest
    sub = f"{stats.records:,} records"
    if m is not None and m.model is not None:
        sub += f" · {m.model} via {m.backend}" + (f" at {m.host}" if m.host else "")
    rejected = (
        _counts_html("Rejected by reason", stats.rejected)
        if stats.rejected
        else '<p class="muted">no rejections recorded.</p>'
    )
    body = [
        f"<h1>magpie stats: {_e(Path(stats.path).name)}</h1>",
        f'<p class="sub">{_e(sub)}</p>',
        _cards(stats),
        "<h2>Kept and rejected</h2>",
        rejected,
        "<h2>Lengths</h2>",
        _length_html(stats),
        "<h2>Judge</h2>",
        _judge_html(stats),
        "<h2>Runs over time</h2>",
        _runs_html(stats.throughput),
        "<h2>Models, templates, backends, turns</h2>",
        '<div class="grid">',
        _counts_html("Models", stats.models),
        _counts_html("Templates", stats.templates),
        _counts_html("Backends", stats.backends),
        _counts_html("User turns per record", {str(k): v for k, v in stats.turns.items()}),
        "</div>",
        "<h2>Diversity of instructions</h2>",
        _diversity_html(stats),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>magpie stats: {_e(Path(stats.path).name)}</title><style>{_CSS}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def html_targets(
    path: Path | str, inputs: list[Path | str | None], *, overwrite: bool = False
) -> Targets:
    """What ``stats --html`` reads and writes, checked (exit 2): an ``--html``
    target that is one of the ``inputs``, not a regular file, or exists
    without ``overwrite`` is refused."""
    targets = Targets(overwrite=overwrite)
    for what, src in zip(("input", "--rejects"), inputs, strict=False):
        targets.read(what, src)
    targets.replace("--html", path)
    return targets.check()


def check_html_target(
    path: Path | str, inputs: list[Path | str | None], *, overwrite: bool = False
) -> Path:
    """:func:`html_targets`' checks, before the numbers are computed."""
    target = html_targets(path, inputs, overwrite=overwrite)["--html"]
    assert target.path is not None
    return target.path


def write_html(
    stats: DataStats,
    path: Path | str,
    *,
    inputs: list[Path | str | None] | None = None,
    overwrite: bool = False,
) -> None:
    """Write the report to ``path`` atomically (a temporary file renamed into
    place), under its lock; ``inputs``: the files the numbers were read from."""
    text = render_html(stats)
    named = inputs if inputs is not None else [stats.path, stats.rejects_path]
    targets = html_targets(path, named, overwrite=overwrite)
    with targets.claim(), AtomicOutput(targets["--html"]) as out:
        out.write(text.encode("utf-8"))
