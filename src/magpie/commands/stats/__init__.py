"""Statistics of a magpie JSONL file: the library behind ``magpie stats``.

>>> from magpie.commands.stats import compute_stats, render_rich, to_json, write_html
>>> stats = compute_stats(Path("data.jsonl"), rejects=Path("data.rejects.jsonl"))  # doctest: +SKIP

:func:`compute_stats` streams the file line by line (it never holds the records:
only counters, one small hash per instruction and one counter per distinct
length), reads ``<file>.manifest.json`` when it is there and an optional rejects
file (JSON lines: a record or a rejection plus ``"reject_reason"``).  It returns
a :class:`DataStats` (``compute``) that three renderers turn into Rich tables
(:func:`render_rich`, ``rich_text``), JSON (:func:`to_json`) or one
self-contained HTML page with inline SVG charts (:func:`write_html`, ``html_page``).

Definitions, so that the numbers can be checked by hand:

* percentiles are nearest-rank: ``pXX`` is the smallest length such that at least
  XX % of the values are less than or equal to it;
* histogram buckets are half-open ``[lo, hi)`` of one width from the 1-2-5 series,
  chosen so that about a dozen buckets cover min..max;
* an instruction's *normalized* form is its casefolded text with runs of
  whitespace collapsed to one space; the unique share is distinct normalized
  instructions over records;
* rejections by reason take, per reason, the larger of the manifest runs' count
  and the rejects file's count: both describe the same attempts, so adding them
  would count a rejection twice, while either may hold reasons the other lacks;
* tokens spent per kept pair are the prompt + completion tokens of the records,
  plus the tokens of rejected work (the manifest runs' totals minus the records'
  tokens; without a manifest, the token counts found in the rejects file), over
  the records kept;
* throughput is records written over wall time (``ended_at - started_at``) per
  manifest run; overall, the sum over runs with a known wall time.
"""

from magpie.commands.stats.compute import DataStats, compute_stats, to_json
from magpie.commands.stats.html_page import check_html_target, render_html, write_html
from magpie.commands.stats.rich_text import render_rich

__all__ = [
    "DataStats",
    "check_html_target",
    "compute_stats",
    "render_html",
    "render_rich",
    "to_json",
    "write_html",
]
