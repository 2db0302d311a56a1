"""A dataset on disk: an output JSONL and the files magpie keeps beside it.

Every sidecar's name is made here, and only here:

* ``<output>.manifest.json``: the run manifest (:mod:`magpie.store.manifest`);
* ``<output>.manifest.json.corrupt``: an unreadable manifest, set aside;
* ``<output>.dedup.npz``: the cache of the dedup index
  (:mod:`magpie.pipeline.stages.dedup.cache`);
* ``<output>.torn``: torn last lines a top-up run moved out of the output
  (:mod:`magpie.store.jsonl`).

There is no ``.lock`` file: the lock is ``flock(2)`` on the output itself
(:mod:`magpie.store.lock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIX = ".manifest.json"
#: Appended to the manifest's own name (``<output>.manifest.json.corrupt``).
CORRUPT_SUFFIX = ".corrupt"
DEDUP_INDEX_SUFFIX = ".dedup.npz"
TORN_SUFFIX = ".torn"


def sidecar(path: Path | str, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its name, beside it."""
    path = Path(path)
    return path.with_name(path.name + suffix)


@dataclass(frozen=True)
class Dataset:
    """An output path and the names of its sidecars."""

    path: Path

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def manifest(self) -> Path:
        return sidecar(self.path, MANIFEST_SUFFIX)

    @property
    def corrupt_manifest(self) -> Path:
        return sidecar(self.manifest, CORRUPT_SUFFIX)

    @property
    def dedup_index(self) -> Path:
        return sidecar(self.path, DEDUP_INDEX_SUFFIX)

    @property
    def torn(self) -> Path:
        return sidecar(self.path, TORN_SUFFIX)

    def sidecars(self) -> dict[str, Path]:
        """Every file magpie may keep beside the output, by what it is."""
        return {
            "manifest": self.manifest,
            "corrupt_manifest": self.corrupt_manifest,
            "dedup_index": self.dedup_index,
            "torn": self.torn,
        }
