"""What ``magpie merge`` did (:class:`MergeReport`, an :class:`InputReport` per
input) and the merged manifest made from it (:func:`merged_manifest`; its
fields are described in :mod:`magpie.commands.merge`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from magpie import __version__
from magpie.commands.merge.inputs import Seen, template_name
from magpie.pipeline.stages.dedup.index import (
    DEFAULT_SEMANTIC_THRESHOLD,
    DEFAULT_THRESHOLD,
    DedupIndex,
)
from magpie.store.manifest import Manifest, RunEntry, manifest_path
from magpie.templates.dates import same_pre_query


@dataclass
class InputReport:
    """What the merge read from one input and what became of its records."""

    path: str
    #: Valid record lines read.
    records: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0
    semantic: int = 0
    #: Records whose id was already read (from an earlier input or line).
    id_collisions: int = 0
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    #: The input's own ``<input>.manifest.json``, None when missing or unreadable.
    manifest: Manifest | None = None
    #: Why there is no manifest, or what is odd about it.
    note: str | None = None

    @property
    def duplicates(self) -> int:
        return self.exact + self.near + self.semantic + self.id_collisions


@dataclass
class MergeReport:
    """What :func:`merge_files` did."""

    output: str
    inputs: list[InputReport] = field(default_factory=list)
    dedup: bool = True
    threshold: float = DEFAULT_THRESHOLD
    #: The embedding model of semantic dedup (None: off).
    semantic_model: str | None = None
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD
    #: Where the merged manifest went (None for stdout).
    manifest_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(i, name) for i in self.inputs)

    @property
    def read(self) -> int:
        return self._sum("records")

    @property
    def kept(self) -> int:
        return self._sum("kept")

    @property
    def exact(self) -> int:
        return self._sum("exact")

    @property
    def near(self) -> int:
        return self._sum("near")

    @property
    def semantic(self) -> int:
        return self._sum("semantic")

    @property
    def id_collisions(self) -> int:
        return self._sum("id_collisions")

    @property
    def duplicates(self) -> int:
        return self.exact + self.near + self.semantic + self.id_collisions

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "kept": self.kept,
            "duplicates": self.duplicates,
            "exact": self.exact,
            "near": self.near,
            "semantic": self.semantic,
            "id_collisions": self.id_collisions,
        }

    def summary(self) -> str:
        files = f"{len(self.inputs)} file" + ("s" if len(self.inputs) != 1 else "")
        return (
            f"{self.kept} kept of {self.read} records in {files}, "
            f"{self.duplicates} duplicates dropped ({self.exact} exact, {self.near} near, "
            + (f"{self.semantic} semantic, " if self.semantic_model else "")
            + f"{self.id_collisions} same id)"
        )


#: Top-level manifest fields that hold the inputs' common value.
_COMMON = ("backend", "host", "model", "model_digest", "model_file", "template")
_MISSING = object()


def _common(values: list[Any]) -> Any:
    """The value all ``values`` share, else ``_MISSING`` (also for none at all)."""
    if not values:
        return _MISSING
    first = values[0]
    return first if all(v == first for v in values[1:]) else _MISSING


def _same_template(a: Any, b: Any) -> bool:
    """One template: equal, or the same rendered on other days (its dates)."""
    if a == b:
        return True
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False

    def rest(t: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in t.items() if k not in ("text", "dates")}

    return rest(a) == rest(b) and same_pre_query(a, b)


def merged_manifest(
    output: Path,
    report: MergeReport,
    index: DedupIndex | None,
    seen: Seen,
    allow_mixed: bool,
) -> Manifest:
    mans = [i.manifest for i in report.inputs if i.manifest is not None]
    fields: dict[str, Any] = {}
    for name in _COMMON:
        values = [getattr(m, name) for m in mans]
        value = _common(values)
        if name == "template" and values and all(_same_template(values[0], v) for v in values):
            value = values[0]  # the first input's dates (each run keeps its own)
        fields[name] = None if value is _MISSING else value
    # The records are the source of truth for what they all share (inputs
    # without a manifest have records too).
    for name, values in (("model", seen.models), ("backend", seen.backends)):
        if len(values) > 1:
            fields[name] = None
            fields["model_digest" if name == "model" else "host"] = None
        elif values:
            fields[name] = next(iter(values))
    templates = list(seen.templates)
    if len({t[0] for t in templates}) > 1:
        fields["template"] = None
    elif fields["template"] is None and len(templates) == 1:
        fields["template"] = {"name": templates[0][0], "source": templates[0][1]}
    seed = _common(list(seen.seeds) or [m.seed for m in mans])
    settings: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in mans for k in m.settings):
        value = _common([m.settings.get(key, _MISSING) for m in mans])
        if value is not _MISSING:
            settings[key] = value
    settings.setdefault("shard", None)
    runs: list[RunEntry] = []
    for info in report.inputs:
        for run in info.manifest.runs if info.manifest is not None else []:
            data = run.model_dump(mode="json")
            data.setdefault("input", info.path)
            runs.append(RunEntry.model_validate(data))
    merge: dict[str, Any] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "dedup": report.dedup,
            "threshold": report.threshold if report.dedup else None,
            "semantic_model": report.semantic_model,
            "semantic_threshold": report.semantic_threshold if report.semantic_model else None,
            "num_perm": index.num_perm if index is not None else None,
            "shingle_size": index.shingle_size if index is not None else None,
            "allow_mixed": allow_mixed,
        },
        "counts": report.counts(),
        "inputs": [_input_entry(i) for i in report.inputs],
        "notes": [i.note for i in report.inputs if i.note],
    }
    return Manifest(
        output=output.name,
        magpie_version=__version__,
        settings=settings,
        seed=None if seed is _MISSING else seed,
        records=report.kept,
        runs=runs,
        kind="merge",
        merge=merge,
        **fields,
    )


def _input_entry(info: InputReport) -> dict[str, Any]:
    man = info.manifest
    return {
        "path": info.path,
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "sha256": info.sha256,
        "records": info.records,
        "kept": info.kept,
        "exact": info.exact,
        "near": info.near,
        "semantic": info.semantic,
        "id_collisions": info.id_collisions,
        "manifest": None
        if man is None
        else {
            "path": manifest_path(Path(info.path)).name,
            "kind": getattr(man, "kind", None) or "generate",
            "magpie_version": man.magpie_version,
            "backend": man.backend,
            "host": man.host,
            "model": man.model,
            "model_digest": man.model_digest,
            "template": template_name(man),
            "shard": man.settings.get("shard"),
            "seed": man.seed,
            "records": man.records,
            "runs": len(man.runs),
        },
        "note": info.note,
    }
