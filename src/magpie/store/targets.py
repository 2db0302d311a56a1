"""Where a command may write: the one set of checks for every file it names.

Every command that writes (``generate``, ``filter``, ``dedup``, ``merge``,
``export``, ``stats --html``) checks its targets here before any work starts:

* a target is a regular file or does not exist yet: a directory, a device, a
  FIFO or a socket is refused (write to stdout and redirect instead);
* an existing target is replaced only with ``--overwrite`` (``generate`` and
  ``filter`` append to theirs: that is their resume);
* no two files a command names are the same file, by any name (a symlink, a
  hard link, a relative path), even with ``--overwrite``: an output is never
  one of the inputs, and rejects never go into a dataset;
* a symlinked target is written through: the file it points to is replaced,
  the link stays.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from magpie.errors import UsageError

STDIO = "-"


def kind_of(path: Path) -> str | None:
    """``None`` for a regular file or a missing one, else what it is ("a FIFO")."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def same_file(a: Path | str | None, b: Path | str | None) -> bool:
    """Whether two names are one file (inode when both exist, else resolved path)."""
    if a is None or b is None or str(a) == STDIO or str(b) == STDIO:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return os.path.realpath(pa) == os.path.realpath(pb)


def check_target(
    path: Path | str, what: str, *, overwrite: bool = False, append: bool = False
) -> Path:
    """Refuse a ``path`` that ``what`` (``output``, ``--rejects``) may not be written to.

    ``append``: the command appends to an existing file (no ``--overwrite``
    needed).  Returns the path, ``~`` expanded.
    """
    p = Path(path).expanduser()
    kind = kind_of(p)
    if kind == "a directory":
        raise UsageError(f"{what} {p} is a directory: give a file path such as {p / 'data.jsonl'}")
    if kind is not None:
        raise UsageError(
            f"{what} {p} is {kind}: magpie writes regular files only "
            "(write to stdout with - and redirect it)"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise UsageError(f"{what} {p}: {parent} is not a directory")
        raise UsageError(f"{what} directory {parent} does not exist: create it first")
    if p.exists() and not overwrite and not append:
        raise UsageError(f"{what} {p} exists: pass --overwrite to replace it")
    return p


def refuse_same(named: Iterable[tuple[str, Path | str | None]]) -> None:
    """Refuse two of the ``(what, path)`` pairs that are the same file."""
    items = [(w, p) for w, p in named if p is not None and str(p) != STDIO]
    for i, (wa, pa) in enumerate(items):
        for wb, pb in items[i + 1 :]:
            if same_file(pa, pb):
                raise UsageError(
                    f"{wa} {pa} and {wb} {pb} are the same file: give each its own path"
                )


def write_path(path: Path) -> Path:
    """Where the bytes for ``path`` go: through a symlink to the file it names."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def stdin_bytes() -> BinaryIO:
    """stdin as bytes, or a clear error when the shell closed it (``<&-``)."""
    if sys.stdin is None:
        raise UsageError("stdin is closed: give the input file instead of -")
    return sys.stdin.buffer


def stdout_bytes() -> BinaryIO:
    """stdout as bytes, or a clear error when the shell closed it (``>&-``)."""
    if sys.stdout is None:
        raise UsageError("stdout is closed: give an output file (-o FILE) instead of -")
    return sys.stdout.buffer
