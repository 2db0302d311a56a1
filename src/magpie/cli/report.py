"""Messages for people and for cron logs: stderr and an optional log file.

stdout is never used here: it carries data only.  ``--quiet`` keeps stderr to
errors; a ``--log-file`` always gets everything (start, backend, summary,
errors), as text lines with a timestamp or as JSON lines (``--log-format json``).
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

from magpie.errors import ExitStatus, MagpieError, UsageError

LogFormat = Literal["text", "json"]


class Reporter:
    def __init__(
        self,
        *,
        quiet: bool = False,
        log_file: str | Path | None = None,
        fmt: LogFormat = "text",
        stream: TextIO | None = None,
    ) -> None:
        if fmt not in ("text", "json"):
            raise UsageError(f"--log-format {fmt!r}: use text or json")
        self.quiet = quiet
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._log: TextIO | None = None
        if log_file is not None:
            p = Path(log_file).expanduser()
            try:
                self._log = p.open("a", encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot open log file {p}: {exc.strerror}") from None

    def _line(
        self, level: str, event: str, message: str, fields: dict[str, Any], stamp: bool
    ) -> str:
        if self.fmt == "json":
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "level": level,
                "event": event,
                "message": message,
                **fields,
            }
            return json.dumps(record, ensure_ascii=False, default=str)
        prefix = {"error": "magpie: error: ", "warning": "magpie: warning: "}.get(level, "magpie: ")
        if stamp:
            return f"{datetime.now().astimezone().isoformat(timespec='seconds')} {prefix}{message}"
        return prefix + message

    def _emit(self, level: str, event: str, message: str, fields: dict[str, Any]) -> None:
        if level in ("error", "warning") or not self.quiet:
            self.stream.write(self._line(level, event, message, fields, stamp=False) + "\n")
            self.stream.flush()
        if self._log is not None:
            self._log.write(self._line(level, event, message, fields, stamp=True) + "\n")
            self._log.flush()

    def info(self, message: str, event: str = "info", **fields: Any) -> None:
        self._emit("info", event, message, fields)

    def warn(self, message: str, event: str = "warning", **fields: Any) -> None:
        """Printed even under --quiet: something to act on."""
        self._emit("warning", event, message, fields)

    def error(self, message: str, event: str = "error", **fields: Any) -> None:
        self._emit("error", event, message, fields)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def report_summary(result: Any, reporter: Any) -> None:
    if result.torn_path is not None:
        reporter.info(
            f"a torn last line was moved to {result.torn_path}",
            event="torn",
            path=str(result.torn_path),
        )
    for note in result.notes:
        reporter.info(note, event="note")
    if not result.notes:
        reporter.info(
            result.stats.summary(),
            event="summary",
            exit_status=int(result.exit_status),
            **result.stats.as_dict(),
        )
    for warning in getattr(result, "warnings", ()):
        reporter.warn(warning)


def report_error(exc: BaseException, reporter: Any, debug: bool) -> ExitStatus:
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, MagpieError):
        reporter.error(str(exc), exit_status=int(exc.exit_status))
        return exc.exit_status
    first = (str(exc).strip().splitlines() or [""])[0]
    reporter.error(f"{exc.__class__.__name__}: {first} (run with --debug for a traceback)")
    return ExitStatus.ERROR
