"""The ``magpie`` command: thin Typer commands over :mod:`magpie.commands`
(``app``), the progress bar and the stderr/log-file report."""
