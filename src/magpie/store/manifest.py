"""The run manifest: ``<output>.manifest.json`` next to the output.

What made the file (magpie version, backend, host, model and its digest,
template strings, generation settings, seed) and every run that wrote to it
(start, end, counts, retries by cause, exit status).  Written atomically
(temporary file, fsync, rename), so a reader never sees half a manifest.
``magpie merge`` writes the same document with a ``merge`` section (see
:mod:`magpie.commands.merge`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from magpie.store.atomic import AtomicFile
from magpie.store.dataset import CORRUPT_SUFFIX, MANIFEST_SUFFIX, sidecar

MANIFEST_VERSION = 1


class RunEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    started_at: str
    ended_at: str | None = None
    pid: int
    requested: int
    existing_before: int
    start_index: int
    next_index: int | None = None
    written: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    retries: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: The dates the template rendered into this run's pre-query (Ollama's
    #: ``currentDate``), when it renders any: the manifest's ``template`` is the
    #: last run's, and each run's records were made with its own day's.
    template_dates: list[str] | None = None
    #: "running" until the run ends; a later run marks a stale one "crashed".
    status: str = "running"
    exit_status: int | None = None
    error: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    manifest_version: int = MANIFEST_VERSION
    output: str
    magpie_version: str
    #: ``backend``, ``model``, ``template`` and ``seed`` are null only in a
    #: merged manifest (``magpie merge``) whose inputs differ in them.
    backend: str | None
    host: str | None = None
    model: str | None
    model_digest: str | None = None
    model_file: dict[str, Any] | None = None
    template: dict[str, Any] | None
    settings: dict[str, Any]
    seed: int | None
    records: int = 0
    runs: list[RunEntry] = Field(default_factory=list)


def manifest_path(output: Path) -> Path:
    return sidecar(output, MANIFEST_SUFFIX)


def read_manifest(output: Path) -> Manifest | None:
    path = manifest_path(output)
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # unreadable: it is rewritten by this run


def set_aside_corrupt(output: Path) -> Path | None:
    """Move an unreadable manifest to ``<manifest>.corrupt`` (never replaced
    silently: it may be the only record of earlier runs); where it went."""
    path = manifest_path(output)
    try:
        Manifest.model_validate_json(path.read_bytes())
        return None
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        aside = sidecar(path, CORRUPT_SUFFIX)
        path.replace(aside)
        return aside


def settle_crashed(manifest: Manifest, records_now: int, next_index: int) -> bool:
    """Mark runs still ``running`` as ``crashed`` (the caller holds the output's
    lock: no run of it is alive), the last one with the records it really
    wrote (the file's count now, not its last manifest update).  Whether any
    changed."""
    changed = False
    for i, run in enumerate(manifest.runs):
        if run.status != "running":
            continue
        run.status = "crashed"
        changed = True
        if i == len(manifest.runs) - 1:
            run.written = max(run.written, records_now - run.existing_before)
            run.next_index = max(run.next_index or 0, next_index)
    if changed:
        manifest.records = records_now
    return changed


def write_manifest(output: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically."""
    path = manifest_path(output)
    data = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    with AtomicFile(path, text=True) as fh:
        fh.write(data)


def file_sha256(path: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "sha256"}`` of a model file.

    Reuses ``previous`` (the last manifest's entry) when size and mtime match:
    hashing a 40 GB GGUF on every nightly run would waste minutes.
    """
    st = path.stat()
    if (
        previous
        and previous.get("path") == str(path)
        and previous.get("size") == st.st_size
        and previous.get("mtime_ns") == st.st_mtime_ns
        and previous.get("sha256")
    ):
        return previous
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": h.hexdigest(),
    }
