"""The charts of ``magpie stats`` as SVG: inline in the HTML report
(:mod:`~magpie.commands.stats.html_page`) and as files of their own in the
Hugging Face folder (:mod:`magpie.commands.publish.folder`, via :func:`standalone`)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable

COLORS = ("#3b82f6", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#06b6d4")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def hbars(items: list[tuple[str, int]], color: str = COLORS[0], width: int = 500) -> str:
    """Horizontal bars with labels and counts."""
    if not items:
        return '<p class="muted">nothing to show</p>'
    label_w, row = 170, 22
    top = max(n for _, n in items) or 1
    bar_w = width - label_w - 60
    height = row * len(items) + 4
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for i, (label, n) in enumerate(items):
        y = 2 + i * row
        w = bar_w * n / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(_clip(label))}'
            f"<title>{_e(label)}</title></text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" rx="3" '
            f'fill="{color}"><title>{_e(label)}: {n}</title></rect>'
            f'<text class="n" x="{label_w + w + 5:.1f}" y="{y + 15}">{n:,}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _text_width(text: str) -> float:
    """Roughly how wide ``text`` is at 12 px (plus a little room), in pixels."""
    return 7.0 * len(text) + 6


def _clip(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def count_label(value: float) -> str:
    return f"{value:,.0f}"


def columns(
    items: list[tuple[str, float]],
    color: str = COLORS[0],
    *,
    fmt: Callable[[float], str] = count_label,
    width: int = 500,
    height: int = 200,
) -> str:
    """Vertical bars (a histogram or ordered levels), labels below, values above."""
    if not items:
        return '<p class="muted">nothing to show</p>'
    top = max(n for _, n in items) or 1
    left, bottom, head = 8, 34, 16
    slot = (width - 2 * left) / len(items)
    plot_h = height - bottom - head
    # Label every column whose label fits; else every 2nd, 3rd... column.
    every = max(1, math.ceil(max(_text_width(label) for label, _ in items) / slot))
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for i, (label, n) in enumerate(items):
        h = plot_h * n / top
        x = left + i * slot
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{head + plot_h - h:.1f}" width="{max(1.0, slot - 2):.1f}" '
            f'height="{h:.1f}" fill="{color}"><title>{_e(label)}: {fmt(n)}</title></rect>'
        )
        if n and _text_width(fmt(n)) <= slot:
            parts.append(
                f'<text class="n" x="{x + slot / 2:.1f}" y="{head + plot_h - h - 3:.1f}" '
                f'text-anchor="middle">{fmt(n)}</text>'
            )
        if i % every == 0:
            half = _text_width(label) / 2
            cx = min(max(x + slot / 2, half), width - half)  # keep the label inside
            parts.append(
                f'<text x="{cx:.1f}" y="{height - bottom + 16}" '
                f'text-anchor="middle">{_e(label)}</text>'
            )
    base = head + plot_h
    parts.append(
        f'<line x1="{left}" y1="{base}" x2="{width - left}" y2="{base}" stroke="#cbd2d9"/></svg>'
    )
    return "".join(parts)


def standalone(svg: str) -> str:
    """A chart for a file of its own: with the namespace an inline SVG does without."""
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
