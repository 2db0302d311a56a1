"""A generation run: ``generate`` and ``agenerate``, the library behind ``magpie generate``.

(The package is ``magpie.commands.generate``, not ``magpie.generate``, so that ``from magpie
import generate`` is the function.)

>>> from magpie import RunConfig, generate
>>> result = generate(RunConfig(num=10, output="data.jsonl"))   # doctest: +SKIP

The CLI is a thin layer over :func:`agenerate`: it builds the :class:`RunConfig`,
wires progress and signals to a :class:`RunControl` and turns errors into exit
codes.

A run, in the order of its modules:

1. ``checks``: every check that needs no backend (exit 2), the persona and
   topic lists read once;
2. ``topup``: the output locked (a second run on it, by any name, fails at
   once, exit 4) and read: valid records count toward ``num``; generation
   continues with the file's seed at the next index;
3. ``opening``: the backend opened and the template resolved (:func:`prepare`),
   then the judge, the guard and the dedup index;
4. ``run``: another model or template is refused into the file
   (``allow_mixed``); each record is written as one line, and
   ``<output>.manifest.json`` at start, every ``MANIFEST_EVERY`` results (at
   most once a second) and at the end, whatever the end was.
"""

from __future__ import annotations

from magpie.commands.generate.checks import Checked, check_run, validate_config
from magpie.commands.generate.opening import Prepared, concurrency_for, prepare
from magpie.commands.generate.run import (
    MANIFEST_EVERY,
    MANIFEST_MAX_AGE,
    MANIFEST_MIN_INTERVAL,
    RunControl,
    RunResult,
    agenerate,
    generate,
    no_system_warning,
)

__all__ = [
    "MANIFEST_EVERY",
    "MANIFEST_MAX_AGE",
    "MANIFEST_MIN_INTERVAL",
    "Checked",
    "Prepared",
    "RunControl",
    "RunResult",
    "agenerate",
    "check_run",
    "concurrency_for",
    "generate",
    "no_system_warning",
    "prepare",
    "validate_config",
]
