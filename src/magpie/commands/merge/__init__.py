"""``magpie merge``: combine the outputs of several runs (shards) into one file.

:func:`merge_files` streams the inputs in the order given and writes one JSONL:

* every line must be a magpie record (else :class:`~magpie.errors.UsageError`,
  exit 2, naming the file and line; nothing is written);
* a record whose ``id`` was already read is the same record again (overlapping
  copies of a shard): it is skipped and counted as an id collision;
* the others go through one :class:`~magpie.pipeline.stages.dedup.index.DedupIndex` over all inputs,
  with the defaults of ``magpie dedup``: the first record of each group of
  exact or near-duplicate instructions is kept (and of semantic duplicates,
  with an ``embed`` function: ``magpie merge --semantic-model``);
* each kept line is copied byte for byte; with ``rejects``, each dropped line
  is written there with ``reject_reason`` ``"duplicate"``, ``duplicate_of``
  (the id it repeats), ``duplicate_kind`` (``exact``, ``near``, ``semantic`` or
  ``id``) and
  ``similarity``, as ``magpie dedup --rejects`` writes them.

The output (and rejects) are written to temporary files renamed into place at
the end, so a failed merge leaves nothing half-written; an existing output is
replaced only with ``overwrite``; an input can never be the output.  The merge
holds the output's lock (exit 4 when another run holds it)
and the inputs' locks, so a shard still being written by ``magpie generate`` is
refused rather than read half-way.  Memory holds the dedup index and the set of
ids read; records are streamed.

Inputs made with another model, model digest or template (by their manifests,
or by their records' ``model`` and ``template``) are refused unless
``allow_mixed``; the error names the input that differs.

The merged manifest, ``<output>.manifest.json``, is a
:class:`~magpie.store.manifest.Manifest` (so ``magpie stats`` and a later top-up read
it) with ``"kind": "merge"``:

* the generation fields (``backend``, ``host``, ``model``, ``model_digest``,
  ``model_file``, ``template``, ``seed``) hold the value the inputs share, null
  where they differ or none is known; ``settings`` holds the generation
  settings every input manifest agrees on (``shard`` is null unless they all
  name the same one);
* ``records`` is the number of records kept; ``runs`` are the inputs' runs, in
  input order, each with an ``input`` key naming the file it came from;
* ``merge`` holds ``created_at``, ``settings`` (dedup on or off, threshold,
  semantic model and threshold, MinHash parameters, allow_mixed), ``counts`` (read, kept, duplicates and each
  kind of them), ``inputs`` (per file: path, size, mtime_ns, sha256, records
  read, kept, dropped by kind, and a summary of its own manifest: model, digest,
  backend, host, template, shard, seed, records; or ``null`` and a note when it
  has none) and ``notes``.

With ``output="-"`` the records stream to stdout as they are kept: no output
lock, no manifest, no dedup index file, and an error part-way leaves what was
already printed.

The package: :mod:`~magpie.commands.merge.files` streams the inputs into the
output (:func:`merge_files`), :mod:`~magpie.commands.merge.inputs` checks and
locks the inputs before anything is read, :mod:`~magpie.commands.merge.report`
holds what the merge did and the merged manifest made from it.
"""

from magpie.commands.merge.files import merge_files
from magpie.commands.merge.report import InputReport, MergeReport

__all__ = ["InputReport", "MergeReport", "merge_files"]
