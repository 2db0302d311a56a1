"""The dates a chat template renders into the pre-query: the day changes them,
not the template.

Ollama's Go templates may call ``currentDate`` and ``yesterdayDate``: the
server's local date, ``2006-01-02`` (``time.Now().Format("2006-01-02")`` in
ollama/ollama template/template.go; its built-in renderers write
``time.DateOnly``, the same).  gpt-oss's template writes ``Current date: {{
currentDate }}``.  A Jinja template may call ``strftime_now(FMT)`` (Llama 3.1
and 3.2: ``Today Date: 26 Jul 2024``), rendered by magpie (the embedded
backend) or by llama-server (``/apply-template``).  So the pre-query of such a
model differs from one day to the next while the template is the same.

:func:`find_dates` finds them in a rendered pre-query: each string that one of
the template's date formats gives for a day near today (two days either side of
today's UTC date: any server's time zone, and ``yesterdayDate``).  A top-up (and
a merge) compares pre-queries with :func:`same_but_dates`: equal but for dates
of the same shape where the template put them; the record id hashes
:func:`undated` text, so it stays the same from day to day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from typing import Any

#: What :func:`undated` writes in place of a date.
DATE_MASK = "{{currentDate}}"
#: The format of Ollama's ``currentDate`` / ``yesterdayDate`` and of its
#: built-in renderers (``time.DateOnly``).
ISO_DATE = "%Y-%m-%d"
#: Days either side of today's UTC date that a rendered date may be.
DAYS_AROUND = 2

_GO_DATE_FUNCS = re.compile(r"\{\{[^}]*\b(?:currentDate|yesterdayDate)\b")
_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(?:"([^"]*)"|'([^']*)')\s*\)""")
#: strftime directives of a date (a format with any other, such as a time of
#: day, changes within a day: it is not looked for).
_DATE_DIRECTIVES = frozenset("aAwdbBmyYjUWGuVCgex")
_DIRECTIVE = re.compile(r"%[-#_^0]?(.)")


def date_formats(template: str | None) -> list[str]:
    """The formats in which ``template`` renders today's date (none: it renders
    no date).  ``None`` (the renderer's template is not known, as for Ollama's
    built-in renderers): Ollama's format."""
    if template is None or not template.strip():
        return [ISO_DATE]
    formats: list[str] = []
    if _GO_DATE_FUNCS.search(template):
        formats.append(ISO_DATE)
    for m in _STRFTIME_NOW.finditer(template):
        fmt = m.group(1) if m.group(1) is not None else m.group(2)
        kinds = {d.group(1) for d in _DIRECTIVE.finditer(fmt)}
        if kinds and kinds <= _DATE_DIRECTIVES | {"%"} and fmt not in formats:
            formats.append(fmt)
    return formats


def _days(now: datetime | None) -> list[date]:
    today = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date()
    return [today + timedelta(days=k) for k in range(-DAYS_AROUND, DAYS_AROUND + 1)]


def find_dates(text: str, formats: Iterable[str], now: datetime | None = None) -> list[str]:
    """The dates in ``text`` that ``formats`` give for a day near ``now``
    (default: the clock), each once, in the order they first appear."""
    found: dict[str, int] = {}
    for fmt in formats:
        for day in _days(now):
            value = day.strftime(fmt)
            at = text.find(value)
            if value and at >= 0 and value not in found:
                found[value] = at
    # A date inside a longer one found too ("1 Aug 2026" in "21 Aug 2026") is not one.
    dates = [d for d in found if not any(d != o and d in o for o in found)]
    return sorted(dates, key=lambda d: found[d])


def undated(text: str, dates: Iterable[str]) -> str:
    """``text`` with each of ``dates`` replaced by :data:`DATE_MASK`: the same
    on every day the template is rendered."""
    for value in sorted(dates, key=len, reverse=True):
        text = text.replace(value, DATE_MASK)
    return text


def _shape(value: str) -> str:
    """A pattern for any date written like ``value`` (digits for digits,
    letters for letters: ``2026-08-21``, ``21 Aug 2026``)."""
    parts = re.findall(r"\d+|[^\W\d_]+|.", value)
    return "".join(
        r"\d+" if p[0].isdigit() else r"[^\W\d_]+" if p[0].isalpha() else re.escape(p)
        for p in parts
    )


def _matches_with_other_dates(text: str, dates: list[str], other: str) -> bool:
    if not dates:
        return False
    shapes = "(?:" + "|".join(dict.fromkeys(_shape(d) for d in dates)) + ")"
    pattern = shapes.join(re.escape(piece) for piece in undated(text, dates).split(DATE_MASK))
    return re.fullmatch(pattern, other, re.S) is not None


def same_but_dates(a: str, a_dates: list[str], b: str, b_dates: list[str]) -> bool:
    """Whether two pre-queries are one template rendered on different days:
    equal, or equal but for other dates where one of them has its ``dates``
    (dates of the same shape, so that a date written another way, or text
    around it that changed, still differs)."""
    return (
        a == b
        or _matches_with_other_dates(a, a_dates, b)
        or _matches_with_other_dates(b, b_dates, a)
    )


def same_pre_query(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two manifests' ``template`` (a :class:`~magpie.templates.PreQuery`
    dumped) have one pre-query text, but for the dates the template rendered
    (:func:`same_but_dates`).  A template without text (a merge of several)
    has nothing to compare: True."""
    ta, tb = a.get("text"), b.get("text")
    if ta is None or tb is None:
        return True
    return same_but_dates(ta, list(a.get("dates") or []), tb, list(b.get("dates") or []))
