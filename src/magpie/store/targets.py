"""Where a command may write: the one check and the one lock for every file it names.

Every command that writes names its files to a :class:`Targets`: what it reads
(:meth:`~Targets.read`), appends to (:meth:`~Targets.append`: ``generate``,
``filter``), replaces (:meth:`~Targets.replace`: ``dedup``, ``merge``,
``export``, ``stats --html``) or replaces as a folder (:meth:`~Targets.folder`:
``export --format hf``).  :meth:`Targets.check` refuses, before any work
(exit 2):

* a target that is neither a regular file nor missing (a directory, a device,
  a FIFO or a socket: write to stdout and redirect instead); a folder target
  that is a file; a target whose directory does not exist or is not writable;
* an existing target without ``--overwrite``, unless the command appends to it
  (that is ``generate``'s and ``filter``'s resume);
* two named files that are the same file by any name (a symlink, a hard link, a
  relative path, a path through a symlinked folder), even with ``--overwrite``:
  an output is never one of the inputs, rejects never go into a dataset; nor a
  named file that is a sidecar magpie keeps beside a dataset output
  (``<output>.manifest.json``, ...), nor one inside a folder target (the folder
  is replaced whole);

and ``with targets.claim():`` checks again and holds every written target's
lock (:class:`~magpie.store.lock.OutputLock`, exit 4 when another run holds
it) for as long as the command runs, then checks what only the lock makes
safe to check: that the target existed before (``--overwrite``), and that a
folder holds nothing but the writer's own earlier output.  A symlinked target
is written through: the file it points to is replaced, the link stays.

The replacing writers take a claimed :class:`Target`
(:class:`~magpie.store.atomic.AtomicOutput`, :class:`~magpie.store.atomic.AtomicFolder`:
the lock moves onto the new file before the rename); the appending ones
(:class:`~magpie.store.jsonl.JsonlWriter`, :class:`~magpie.store.jsonl.RejectsWriter`)
write the paths of claimed targets.  No module of ``commands/`` or ``cli/``
writes, renames or removes a file itself (``tests/test_writers.py`` holds
them to it).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from magpie.errors import UsageError
from magpie.store.lock import OutputLock, OutputLocked

STDIO = "-"

Mode = Literal["read", "append", "replace", "folder"]
#: What in a folder target is not the writer's own (None: all of it is).
Foreign = Callable[[Path], "str | None"]


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


def inside(path: Path | str, folder: Path | str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (by resolved paths)."""
    real, top = Path(os.path.realpath(Path(path).expanduser())), Path(os.path.realpath(folder))
    return real == top or top in real.parents


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
    _check_parent(p, what)
    if p.exists() and not overwrite and not append:
        raise UsageError(f"{what} {p} exists: pass --overwrite to replace it")
    return p


def _check_parent(p: Path, what: str) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise UsageError(f"{what} {p}: {parent} is not a directory")
        raise UsageError(f"{what} directory {parent} does not exist: create it first")


def check_folder(path: Path | str, what: str, *, overwrite: bool = False) -> Path:
    """Refuse a folder target that is a file, a device, or exists without ``overwrite``."""
    p = Path(path).expanduser()
    kind = kind_of(p)
    if p.is_file() or kind not in (None, "a directory"):
        raise UsageError(f"{what} {p} is {kind or 'a file'}: this writes a folder")
    _check_parent(p, what)
    if p.exists() and not overwrite:
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


def probe_writable(p: Path, what: str) -> None:
    """Refuse a file that cannot be written, creating nothing (os.access says
    yes to root even on a read-only mount, so try for real)."""
    parent = p.parent if str(p.parent) else Path(".")
    try:
        if p.exists() and not p.is_dir():
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
        else:
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"{what} {p} is not writable ({exc.strerror}): pick another path"
        ) from None


@dataclass(eq=False)
class Target:
    """One file (or folder) a command names, and how it uses it."""

    what: str
    #: None: stdin or stdout (``-``).
    path: Path | None
    mode: Mode
    #: Whether :meth:`Targets.claim` locks it (every written file; an input
    #: only where the command asks, as ``merge`` does).
    locks: bool = True
    #: Files magpie keeps beside a dataset output, by what they are: no other
    #: named file may be one of them.
    sidecars: Mapping[str, Path] = field(default_factory=dict)
    #: A folder target: what in it is not the writer's own earlier output.
    foreign: Foreign | None = None
    #: An input this output may be (``magpie dedup`` in place).
    may_be: Target | None = None
    #: Held while claimed.
    lock: OutputLock | None = field(default=None, repr=False)
    #: Whether the target existed before the command's lock (claimed only).
    existed: bool = False

    @property
    def writes(self) -> bool:
        return self.mode != "read"

    @property
    def claimed(self) -> bool:
        return self.path is None or self.lock is not None and self.lock.held

    def named(self) -> str:
        """How a message names it: ``output X``, ``the input X``."""
        return (
            f"the {self.what} {self.path}" if self.what == "input" else f"{self.what} {self.path}"
        )


class Targets:
    """The files one command names, checked together and locked together.

    ``overwrite``: the command's ``--overwrite`` (replace existing targets).
    Build it with :meth:`read`, :meth:`append`, :meth:`replace` and
    :meth:`folder`; :meth:`check` before any work, ``with targets.claim():``
    around the writing.
    """

    def __init__(self, *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self.named: list[Target] = []
        self._held: list[OutputLock] = []

    def _add(self, what: str, path: Path | str | None, mode: Mode, **kw: object) -> Target:
        p = None if path is None or str(path) == STDIO else Path(path).expanduser()
        target = Target(what, p, mode, **kw)  # type: ignore[arg-type]
        if path is not None:
            self.named.append(target)
        return target

    def read(self, what: str, path: Path | str | None, *, lock: bool = False) -> Target:
        """An input (``lock``: held against a writer while it is read)."""
        return self._add(what, path, "read", locks=lock)

    def append(
        self, what: str, path: Path | str | None, *, sidecars: Mapping[str, Path] | None = None
    ) -> Target:
        """A file appended to (``-``: stdout)."""
        return self._add(what, path, "append", sidecars=dict(sidecars or {}))

    def replace(
        self,
        what: str,
        path: Path | str | None,
        *,
        sidecars: Mapping[str, Path] | None = None,
        may_be: Target | None = None,
    ) -> Target:
        """A file replaced whole (``-``: stdout); ``may_be``: an input it may be."""
        return self._add(what, path, "replace", sidecars=dict(sidecars or {}), may_be=may_be)

    def folder(self, what: str, path: Path | str, *, foreign: Foreign) -> Target:
        """A folder replaced whole; ``foreign`` says what in an existing one is
        not the writer's own (it is then never replaced, even with --overwrite)."""
        return self._add(what, path, "folder", foreign=foreign)

    def get(self, what: str) -> Target | None:
        """The named target ``what`` (None: not named)."""
        return next((t for t in self.named if t.what == what), None)

    def __getitem__(self, what: str) -> Target:
        found = self.get(what)
        if found is None:
            raise KeyError(what)
        return found

    # -- the checks ---------------------------------------------------------

    def check(self, *, exists: bool = True) -> Targets:
        """Every check that needs no lock (exit 2); creates nothing.  ``exists``:
        refuse an existing target without ``--overwrite`` now (:meth:`claim`
        checks that once it holds the lock, so that a target another run is
        writing is exit 4, whatever the flags)."""
        overwrite = self.overwrite or not exists
        self._check_apart()
        for t in self.named:
            if t.path is None:
                if t.writes:
                    stdout_bytes()  # a closed stdout fails now, not after the work
                continue
            if t.mode == "folder":
                check_folder(t.path, t.what, overwrite=overwrite)
                probe_writable(t.path, t.what)
            elif t.writes:
                check_target(
                    t.path,
                    t.what,
                    overwrite=overwrite or t.may_be is not None,
                    append=t.mode == "append",
                )
                probe_writable(t.path, t.what)
        return self

    def _check_apart(self) -> None:
        on_stdout = [t.what for t in self.named if t.path is None and t.writes]
        if len(on_stdout) > 1:  # their lines would mix in one stream
            raise UsageError(
                f"{' and '.join(on_stdout)} cannot both be stdout (-): give {on_stdout[-1]} a file"
            )
        items = [t for t in self.named if t.path is not None]
        for i, a in enumerate(items):
            for b in items[i + 1 :]:
                if (a.writes or b.writes) and same_file(a.path, b.path):
                    if a.may_be is b or b.may_be is a:
                        continue
                    raise UsageError(_same_message(a, b))
        for t in items:
            for name, side in t.sidecars.items():
                for other in items:
                    if other is not t and same_file(side, other.path):
                        raise UsageError(
                            f"{other.named()} is where magpie keeps the {name} of {t.what} "
                            f"{t.path}: pick another path"
                        )
            if t.mode == "folder":
                assert t.path is not None
                for other in items:
                    if other is not t and inside(other.path, t.path):  # type: ignore[arg-type]
                        raise UsageError(
                            f"{t.what} {t.path} holds {other.named()}, and the folder is "
                            "replaced whole: pick another folder"
                        )

    # -- the lock -----------------------------------------------------------

    def claim(self) -> Targets:
        """Check, then hold the lock of every written target (and of each input
        read with ``lock``) until :meth:`release`; exit 4 when another run holds one."""
        self.check(exists=False)
        try:
            for t in self.named:
                if t.path is None or not t.locks:
                    continue
                lock = OutputLock(
                    t.path,
                    t.what,
                    create=t.writes,
                    replace=t.mode in ("replace", "folder"),
                    folder=t.mode == "folder",
                )
                try:
                    lock.acquire()
                except OutputLocked:
                    if t.writes:
                        raise
                    raise OutputLocked(
                        f"another magpie run is writing {t.named()}: "
                        "wait for it to finish before reading it"
                    ) from None
                self._held.append(lock)
                t.lock, t.existed = lock, t.writes and lock.existed
            for t in self.named:
                self._check_claimed(t)
        except BaseException:
            self.release()
            raise
        return self

    def _check_claimed(self, t: Target) -> None:
        """What only the lock makes safe to check: the target as it is now."""
        if not t.writes or t.path is None or not t.existed:
            return
        if t.mode == "replace" and not self.overwrite and t.may_be is None:
            raise UsageError(f"{t.what} {t.path} exists: pass --overwrite to replace it")
        if t.mode == "folder":
            if not self.overwrite:
                raise UsageError(f"{t.what} {t.path} exists: pass --overwrite to replace it")
            refuse_foreign(t)

    def release(self) -> None:
        while self._held:
            self._held.pop().release()
        for t in self.named:
            t.lock = None

    def __enter__(self) -> Targets:
        if not self._held:
            self.claim()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def refuse_foreign(t: Target) -> None:
    """Refuse to replace a folder that holds what its writer did not make."""
    assert t.path is not None and t.foreign is not None
    found = t.foreign(t.path)
    if found is not None:
        raise UsageError(
            f"{t.what} {t.path} holds {found}, which is not part of an earlier magpie "
            "export: --overwrite replaces only that; pick another folder or move it away"
        )


def _same_message(a: Target, b: Target) -> str:
    r, w = (a, b) if not a.writes else (b, a)
    if not r.writes:
        return (
            f"{w.what} {w.path} is {r.named()} (the same file): give the {w.what} a path of its own"
        )
    return f"{a.what} {a.path} and {b.what} {b.path} are the same file: give each its own path"


def stdin_bytes() -> BinaryIO:
    """stdin as bytes, or a clear error when the shell closed it (``<&-``)."""
    if sys.stdin is None:
        raise UsageError("stdin is closed: give the input file instead of -")
    return sys.stdin.buffer


def stdout_bytes(hint: str = "give an output file (-o FILE) instead of -") -> BinaryIO:
    """stdout as bytes, or a clear error when the shell closed it (``>&-``):
    every command's data reaches stdout through here (``hint``: what to do)."""
    if sys.stdout is None:
        raise UsageError(f"stdout is closed: {hint}")
    return sys.stdout.buffer
