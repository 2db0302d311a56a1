"""Publishing: ``magpie card``, ``magpie export --format hf|sqlite`` (a thin layer
over :mod:`magpie.commands.publish`).  The card's options are declared once in
:mod:`magpie.cli.options` (``CardLicense``, ``CardLanguages``, ``CardName``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from magpie.cli.options import (
    CardLanguages,
    CardLicense,
    CardName,
    DataWithManifest,
    Debug,
    RejectsOfRuns,
)
from magpie.cli.terminal import err, fail, out
from magpie.errors import MagpieError, UsageError
from magpie.store.targets import STDIO


def _export(
    fmt: str,
    input: str,
    output: str,
    writes: str,
    run: Callable[[], Any],
    then: Callable[[Any], str],
    rejects: Path | None,
    quiet: bool,
    debug: bool,
) -> None:
    """One export from a file to a file or folder (``writes``: what, and how to
    name it); on success, the records and rejects written, then ``then(result)``."""
    try:
        if input == STDIO or output == STDIO:
            raise UsageError(f"--format {fmt} reads a file and writes {writes}")
        res = run()
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    if not quiet:
        extra = f" and {res.rejects} rejects" if rejects is not None else ""
        err(f"magpie: exported {res.records} records{extra} as {fmt} to {res.path}{then(res)}")


def export_folder(
    input: str,
    output: str,
    rejects: Path | None,
    overwrite: bool,
    license: str,
    language: list[str] | None,
    name: str | None,
    quiet: bool,
    debug: bool,
) -> None:
    """``magpie export --format hf -o DIR``."""

    def run() -> Any:
        from magpie.commands.publish.folder import export_hf

        return export_hf(
            input,
            output,
            rejects=rejects,
            overwrite=overwrite,
            license=license,
            languages=language,
            pretty_name=name,
        )

    def then(res: Any) -> str:
        return (
            f" ({res.shards} Parquet shard{'s' if res.shards != 1 else ''} and README.md); "
            f"publish with: hf upload REPO {res.path} --repo-type dataset"
        )

    _export(
        "hf", input, output, "a folder: give INPUT and -o DIR", run, then, rejects, quiet, debug
    )


def export_database(
    input: str, output: str, rejects: Path | None, overwrite: bool, quiet: bool, debug: bool
) -> None:
    """``magpie export --format sqlite -o data.db``."""

    def run() -> Any:
        from magpie.commands.publish.sqlite import export_sqlite

        return export_sqlite(input, output, rejects=rejects, overwrite=overwrite)

    def then(res: Any) -> str:
        return f"; browse with: datasette {res.path} -o"

    _export(
        "sqlite", input, output, "one: give INPUT and -o FILE", run, then, rejects, quiet, debug
    )


def card(
    input: DataWithManifest,
    rejects: RejectsOfRuns = None,
    license: CardLicense = "unknown",
    language: CardLanguages = None,
    name: CardName = None,
    debug: Debug = False,
) -> None:
    """Print the Hugging Face dataset card (README.md) of a magpie JSONL."""
    try:
        from magpie.commands.publish.folder import card_text

        text = card_text(
            input, rejects=rejects, license=license, languages=language, pretty_name=name
        )
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    out(text.rstrip("\n"))
