"""Publishing: ``magpie card``, ``magpie export --format hf|sqlite`` (a thin layer
over :mod:`magpie.commands.publish`)."""

from __future__ import annotations

from pathlib import Path

import typer

from magpie.cli.options import Debug
from magpie.cli.terminal import err, fail, out
from magpie.errors import MagpieError, UsageError
from magpie.store.targets import STDIO

License = typer.Option(
    "unknown",
    "--license",
    help="The card's license (a Hub license id); `unknown` until you choose one.",
)
Language = typer.Option(
    None, "--language", help="A language of the data (ISO 639-1; repeat for several)."
)
Name = typer.Option(None, "--name", help="The card's pretty name.")


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
    try:
        if input == STDIO or output == STDIO:
            raise UsageError("--format hf reads a file and writes a folder: give INPUT and -o DIR")
        from magpie.commands.publish.folder import export_hf

        res = export_hf(
            input,
            output,
            rejects=rejects,
            overwrite=overwrite,
            license=license,
            languages=language,
            pretty_name=name,
        )
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    if not quiet:
        extra = f" and {res.rejects} rejects" if rejects is not None else ""
        err(
            f"magpie: exported {res.records} records{extra} as hf to {res.path} "
            f"({res.shards} Parquet shard{'s' if res.shards != 1 else ''} and README.md); "
            f"publish with: hf upload REPO {res.path} --repo-type dataset"
        )


def export_database(
    input: str, output: str, rejects: Path | None, overwrite: bool, quiet: bool, debug: bool
) -> None:
    """``magpie export --format sqlite -o data.db``."""
    try:
        if input == STDIO or output == STDIO:
            raise UsageError("--format sqlite reads a file and writes one: give INPUT and -o FILE")
        from magpie.commands.publish.sqlite import export_sqlite

        res = export_sqlite(input, output, rejects=rejects, overwrite=overwrite)
    except (MagpieError, Exception) as exc:  # noqa: BLE001
        raise fail(exc, debug) from None
    if not quiet:
        extra = f" and {res.rejects} rejects" if rejects is not None else ""
        err(
            f"magpie: exported {res.records} records{extra} as sqlite to {res.path}; "
            f"browse with: datasette {res.path} -o"
        )


def card(
    input: str = typer.Argument(..., help="magpie JSONL (its manifest is read when present)."),
    rejects: Path | None = typer.Option(None, "--rejects", help="Rejects file of the same runs."),
    license: str = License,
    language: list[str] | None = Language,
    name: str | None = Name,
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
