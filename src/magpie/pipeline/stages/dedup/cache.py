"""The dedup index's cache next to its output: ``<output>.dedup.npz``.

It is only a cache: the JSONL is the source of truth.  The index uses it as is
when the output is byte for byte what it was at the last save (the
:func:`fingerprint`: size, mtime, hash of its last 64 KiB) and otherwise
rebuilds from the JSONL, reusing the cached values of instructions it knows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from magpie.store.jsonl import RecordReader

CACHE_SUFFIX = ".dedup.npz"
#: Bump when normalization, shingle hashing or the cache layout change.
CACHE_FORMAT = 1

_TAIL_BYTES = 65536  # bytes of the output hashed into the cache fingerprint


def cache_path(output: Path | str) -> Path:
    """Where the dedup index of ``output`` lives: ``<output>.dedup.npz``."""
    output = Path(output)
    return output.with_name(output.name + CACHE_SUFFIX)


def fingerprint(output: Path) -> dict[str, Any]:
    try:
        st = output.stat()
    except FileNotFoundError:
        return {"size": 0}
    with output.open("rb") as fh:
        fh.seek(max(0, st.st_size - _TAIL_BYTES))
        tail = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "tail": tail}


def read_cache(path: Path) -> dict[str, Any] | None:
    """The cached arrays, or None when missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            cache: dict[str, Any] = {k: data[k] for k in data.files}
        cache["meta"] = json.loads(cache["meta"].tobytes())
        cache["ids"] = cache["ids"].tolist()
        n = len(cache["ids"])
        if len(cache["digests"]) != n or cache["sigs"].shape[0] != n:
            return None
        if "vectors" in cache and len(cache["vectors"]) != n:
            del cache["vectors"]
        return cache
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache is rebuilt, never fatal
        return None


def read_instructions(output: Path) -> Iterable[tuple[str, str]]:
    """``(id, instruction)`` of each record of an output JSONL, streamed; a torn
    last line is ignored (``generate`` sets it aside)."""
    for line in RecordReader(output, torn="stop", then="cannot build its dedup index"):
        yield line.record.id, line.record.instruction
