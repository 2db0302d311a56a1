"""The inputs of ``magpie merge``, before and while they are read: each a file
given once, locked against a ``magpie generate`` still appending to it, its
own manifest, and one model and template across them all (unless
``allow_mixed``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from magpie.errors import UsageError
from magpie.records import Record
from magpie.store.dataset import Dataset
from magpie.store.manifest import Manifest, manifest_path, read_manifest
from magpie.store.targets import STDIO, Targets
from magpie.templates.dates import same_pre_query


def check_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    if not inputs:
        raise UsageError("give at least one input file to merge")
    paths: list[Path] = []
    files: dict[tuple[int, int], Path] = {}
    for raw in inputs:
        if str(raw) == STDIO:
            raise UsageError(
                "merge reads files, not stdin (-): save the stream to a file, "
                "or use `magpie dedup -`"
            )
        p = Path(raw).expanduser()
        if not p.is_file():
            raise UsageError(f"input {raw} does not exist or is not a file")
        st = p.stat()
        twice = files.setdefault((st.st_dev, st.st_ino), p)
        if twice is not p:
            raise UsageError(f"input {raw} is given twice (the same file as {twice})")
        paths.append(p)
    return paths


def merge_targets(
    paths: list[Path], output: Path | str, rejects: Path | str | None, overwrite: bool
) -> Targets:
    """What a merge reads (each input locked while read, so that no ``magpie
    generate`` appends to it meanwhile) and writes: the output, with its
    manifest and dedup index beside it, and ``rejects``."""
    targets = Targets(overwrite=overwrite)
    for p in paths:
        targets.read("input", p, lock=True)
    sidecars = None
    if str(output) != STDIO:
        data = Dataset(Path(output).expanduser())
        sidecars = {"manifest": data.manifest, "dedup index": data.dedup_index}
    targets.replace("output", output, sidecars=sidecars)
    targets.replace("--rejects", rejects)
    return targets


def input_manifest(path: Path) -> tuple[Manifest | None, str | None]:
    mpath = manifest_path(path)
    if not mpath.exists():
        return None, f"{path} has no manifest ({mpath.name}): its run settings are unknown"
    man = read_manifest(path)
    if man is None:
        return None, f"{path}: its manifest {mpath.name} is unreadable; ignored"
    return man, None


def check_mixed_manifests(
    paths: list[Path], manifests: list[tuple[Manifest | None, str | None]]
) -> None:
    """Refuse inputs whose manifests name another model, digest or template."""
    ref: tuple[Path, Manifest] | None = None
    for path, (man, _) in zip(paths, manifests, strict=True):
        if man is None:
            continue
        if ref is None:
            ref = (path, man)
            continue
        first_path, first = ref
        problems = []
        if man.model != first.model:
            problems.append(f"model {man.model!r} ({first_path}: {first.model!r})")
        if man.model_digest and first.model_digest and man.model_digest != first.model_digest:
            problems.append(
                f"model digest {man.model_digest[:19]} ({first_path}: {first.model_digest[:19]})"
            )
        name, first_name = template_name(man), template_name(first)
        if name != first_name:
            problems.append(f"template {name!r} ({first_path}: {first_name!r})")
        # The same template rendered on other days (its `currentDate`) is the same.
        if not problems and not same_pre_query(man.template or {}, first.template or {}):
            problems.append(
                f"a different pre-query text (system prompt or template) than {first_path}"
            )
        if problems:
            raise UsageError(
                f"{path} was made with {'; '.join(problems)}: pass --allow-mixed to merge "
                "them anyway"
            )


def template_name(man: Manifest) -> str | None:
    return (man.template or {}).get("name")


class Seen:
    """Ids read so far, and the model, template, backend and seed of the records."""

    def __init__(self, allow_mixed: bool) -> None:
        self.allow_mixed = allow_mixed
        self.ids: set[str] = set()
        self.first: tuple[str, str, str] | None = None  # (path, model, template)
        self.models: dict[str, None] = {}
        self.templates: dict[tuple[str, str], None] = {}
        self.backends: dict[str, None] = {}
        self.seeds: dict[int, None] = {}

    def note(self, rec: Record, path: Path, lineno: int) -> None:
        if self.first is None:
            self.first = (str(path), rec.model, rec.template)
        elif not self.allow_mixed and (rec.model, rec.template) != self.first[1:]:
            first_path, model, template = self.first
            raise UsageError(
                f"{path} line {lineno} holds a record of model {rec.model!r}, template "
                f"{rec.template!r} ({first_path}: model {model!r}, template {template!r}): "
                "pass --allow-mixed to merge them anyway"
            )
        self.models.setdefault(rec.model)
        self.templates.setdefault((rec.template, rec.template_source))
        self.backends.setdefault(rec.backend)
        self.seeds.setdefault(rec.seed)
