"""Deduplication of instructions: exact, near (MinHash LSH) and semantic.

Three checks, in this order, each against the records already kept:

* **exact**: a 64-bit BLAKE2b hash of the normalized instruction
  (:func:`normalize`: Unicode NFKC, casefold, whitespace collapsed, punctuation
  and spaces stripped at both ends).  ``"What is X?"`` and ``"  what is x"`` are
  the same instruction.
* **near**: MinHash over character 5-grams of the normalized text, banded LSH
  to find candidates, and the estimated Jaccard similarity (share of equal
  MinHash values) against ``threshold`` (default 0.7) to confirm them.
  Character shingles work for every script (Chinese and Japanese have no
  spaces to split words on) and tolerate typos and inflections; a one-word
  change in a 20-word instruction scores about 0.85, two instructions from the
  same template with different content words about 0.4 to 0.55.
* **semantic** (optional, when an ``embed`` function is given): cosine
  similarity of embeddings against ``semantic_threshold`` (default 0.95), with
  a `usearch <https://github.com/unum-cloud/usearch>`_ HNSW index when that
  package is installed, else exact numpy search (fine up to some 50,000
  records).  The CLI's ``--semantic-model`` gives an embedding model on a
  server (:mod:`magpie.pipeline.stages.dedup.embeddings`); an asynchronous caller (the pipeline)
  awaits a text's embedding itself and hands it over with
  :meth:`DedupIndex.remember_embedding`, so that ``check``/``add`` need not
  call ``embed``.

The MinHash values are those of ``datasketch.MinHash`` with
``scheme="affine32"`` and the same seed, fed the shingle hashes of
:meth:`MinHasher.shingle_hashes` (the tests check this), but computed for many
texts at once with numpy: hashing is the expensive part, and datasketch's
per-document ``update`` loop would take minutes for 100,000 texts.  The LSH
band tables are plain dicts of integer band keys: at 100,000 texts 2.5 times
faster than ``datasketch.MinHashLSH`` with its per-band byte-string keys, in a
third of the memory.  Band parameters are datasketch's optimum for the
threshold, weighted towards recall (:func:`lsh_params`).

An index of an output file persists next to it as ``<output>.dedup.npz``
(:meth:`DedupIndex.save`, atomic).  It is only a cache: the JSONL is the
source of truth.  :meth:`DedupIndex.open` uses the cache as is when the output
is byte for byte what it was at the last save (size, mtime, hash of its last
64 KiB), and otherwise rebuilds the index from the JSONL, reusing the cached
MinHash values and embeddings of instructions it already knows.  A crash
between writing a record and saving the index therefore never loses a
decision.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from magpie.errors import MagpieError, UsageError
from magpie.pipeline.stages.dedup.cache import (
    CACHE_FORMAT,
    cache_path,
    fingerprint,
    read_cache,
    read_instructions,
)
from magpie.pipeline.stages.dedup.minhash import (
    BATCH,
    DEFAULT_NUM_PERM,
    DEFAULT_SHINGLE_SIZE,
    MINHASH_SEED,
    MinHasher,
    lsh_params,
    normalize,
    text_hash,
)

#: Defaults, chosen and measured in benchmarks/README.md.
from magpie.pipeline.stages.dedup.vectors import _VectorIndex
from magpie.store.atomic import AtomicFile

DEFAULT_THRESHOLD = 0.7
DEFAULT_SEMANTIC_THRESHOLD = 0.95

_EMBED_CACHE = 1024  # embeddings kept between check() and add() of the same text
_PREPARED_CACHE = 1024  # prepared texts kept between check() and add() of the same text


@dataclass
class Duplicate:
    """Why a text was found to duplicate an earlier record."""

    kind: Literal["exact", "near", "semantic"]
    #: The id of the earlier record it duplicates.
    of_id: str
    #: 1.0 for exact; estimated Jaccard (near) or cosine (semantic) otherwise.
    similarity: float


@dataclass
class DedupCounts:
    """What :func:`dedup_file` did."""

    total: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0
    semantic: int = 0
    #: Whether semantic duplicates were looked for (an embedding model was set).
    semantic_on: bool = False

    @property
    def duplicates(self) -> int:
        return self.exact + self.near + self.semantic


class _Item(NamedTuple):
    """One text, prepared for checking and adding."""

    text: str
    digest: int
    sig: np.ndarray
    keys: list[int]


EmbedFn = Callable[[list[str]], list[list[float]]]


class DedupIndex:
    """Exact, near- and (optionally) semantic-duplicate index of instructions.

    ``check`` is read-only; ``add`` records a kept record; ``check_and_add``
    does both, adding only a text that is not a duplicate.  Use one instance
    from one thread.

    With an output file: ``DedupIndex.open(output)`` before a run, ``add`` each
    record once its line is written (or ``check_and_add`` when the instruction
    arrives and ``discard`` if its record is then not written), and
    ``save(output)`` when the records of all added ids are in the file.
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        num_perm: int = DEFAULT_NUM_PERM,
        embed: EmbedFn | None = None,
        semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        embed_name: str | None = None,
        ann: Literal["auto", "usearch", "numpy"] = "auto",
    ) -> None:
        """``embed`` turns a batch of texts into vectors (semantic dedup is off
        without it); ``embed_name`` names its model, so that cached vectors are
        reused only for the same model.  ``ann`` picks the vector index:
        ``usearch`` (HNSW) or exact ``numpy`` search; ``auto`` takes usearch
        when it is installed."""
        if not 0.0 < threshold <= 1.0:
            raise UsageError(f"dedup threshold must be in (0, 1], got {threshold}")
        if not 0.0 < semantic_threshold <= 1.0:
            raise UsageError(
                f"semantic dedup threshold must be in (0, 1], got {semantic_threshold}"
            )
        if not 2 <= num_perm <= 1024:
            raise UsageError(f"dedup num_perm must be in 2..1024, got {num_perm}")
        if not 1 <= shingle_size <= 32:
            raise UsageError(f"dedup shingle size must be in 1..32, got {shingle_size}")
        if ann not in ("auto", "usearch", "numpy"):
            raise UsageError(f"dedup vector index must be auto, usearch or numpy, got {ann!r}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.embed = embed
        self.embed_name = embed_name
        self.semantic_threshold = semantic_threshold
        self.hasher = MinHasher(num_perm, shingle_size)
        self.bands, self.rows_per_band = lsh_params(threshold, num_perm)
        self._band_mult = np.random.RandomState(MINHASH_SEED + 1).randint(
            1, 1 << 63, self.rows_per_band, dtype=np.uint64
        ) | np.uint64(1)
        #: How :meth:`open` got the index: "new", "empty", "cache" or "rebuilt".
        self.source = "new"
        self._ids: list[str] = []
        self._digests: list[int] = []
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)
        self._exact: dict[int, int] = {}
        self._tables: list[dict[int, Any]] = [{} for _ in range(self.bands)]
        self._dead: set[int] = set()
        self._vectors: _VectorIndex | None = None
        self._ann = ann
        self._embed_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        #: Texts ``check`` prepared (normalised, hashed, MinHashed), kept until
        #: ``add``/``check_and_add`` of the same text: a run checks each
        #: instruction when it arrives and adds it when its record is emitted.
        self._prepared: OrderedDict[str, _Item] = OrderedDict()

    # -- public API -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids) - len(self._dead)

    def check(self, text: str, *, semantic: bool = True) -> Duplicate | None:
        """The earlier record ``text`` duplicates, or None.  Changes nothing.

        ``semantic=False`` checks exact and near duplicates only (no embedding
        is needed): an asynchronous caller checks that first, then awaits the
        embedding, hands it over with :meth:`remember_embedding` and checks
        again."""
        item = self._prepared.get(text)
        if item is None:
            item = self._prepare([text])[0]
            self._prepared[text] = item  # for the add of the same text that may follow
            if len(self._prepared) > _PREPARED_CACHE:
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(text)
        return self._check(item, semantic=semantic)

    def repeats(self, text: str, earlier: Sequence[str]) -> tuple[int, str, float] | None:
        """Which of ``earlier`` (texts outside the index: the user turns of one
        conversation) ``text`` duplicates, by the index's exact and near rules:
        ``(position, kind, similarity)`` of the most similar, or None.  Changes
        nothing."""
        if not earlier:
            return None
        item, *others = self._prepare([text, *earlier])
        best: tuple[int, str, float] | None = None
        for pos, other in enumerate(others):
            if other.digest == item.digest:
                return pos, "exact", 1.0
            similarity = float(np.count_nonzero(other.sig == item.sig)) / self.num_perm
            if similarity >= self.threshold and (best is None or similarity > best[2]):
                best = (pos, "near", similarity)
        return best

    def has_embedding(self, text: str) -> bool:
        """Whether ``check``/``add`` of ``text`` would find its vector without
        calling ``embed`` (always True when semantic dedup is off)."""
        return self.embed is None or text in self._embed_cache

    def remember_embedding(self, text: str, vector: Sequence[float] | np.ndarray) -> None:
        """Hand over the embedding of ``text``, computed elsewhere (an event loop
        awaiting an asynchronous embedding call), so that the next ``check`` or
        ``add`` of ``text`` uses it instead of calling ``embed``.  Kept for the
        last 1024 texts."""
        self._cache_embedding(text, self._unit_vectors([vector], 1)[0])

    def add(self, record_id: str, text: str) -> None:
        """Record that the record ``record_id`` with instruction ``text`` is kept."""
        vector = self._embed_one(text) if self.embed is not None else None
        self._add(record_id, self._prepared_item(text), vector)

    def check_and_add(self, record_id: str, text: str) -> Duplicate | None:
        """:meth:`check`, then :meth:`add` when ``text`` is not a duplicate."""
        item = self._prepared_item(text)
        dup = self._check(item)
        if dup is None:
            vector = self._embed_one(text) if self.embed is not None else None
            self._add(record_id, item, vector)
        return dup

    def check_and_add_many(self, items: Iterable[tuple[str, str]]) -> list[Duplicate | None]:
        """``check_and_add`` of each ``(record_id, text)`` in order, hashing in batches.

        The same decisions as one ``check_and_add`` per item, several times faster.
        With ``embed``, every text of a batch is embedded (one call per batch).
        """
        out: list[Duplicate | None] = []
        batch: list[tuple[str, str]] = []
        for pair in items:
            batch.append(pair)
            if len(batch) >= BATCH:
                out.extend(self._check_and_add_batch(batch))
                batch = []
        out.extend(self._check_and_add_batch(batch))
        return out

    def discard(self, record_id: str) -> bool:
        """Forget the last added record with this id (its line was not written)."""
        for row in range(len(self._ids) - 1, -1, -1):
            if self._ids[row] == record_id and row not in self._dead:
                self._remove(row)
                return True
        return False

    @classmethod
    def open(cls, output: Path | str, *, verify: bool = False, **kwargs: Any) -> DedupIndex:
        """The index of ``output``: its cache when it matches, else rebuilt from the JSONL.

        ``kwargs`` are the constructor's.  ``verify=True`` always rereads the JSONL (still reusing cached hashes).
        A line that is not a magpie record is a :class:`UsageError`; a torn
        last line (no newline, not JSON) is ignored, as ``magpie generate``
        sets it aside.
        """
        index = cls(**kwargs)
        output = Path(output)
        cache = read_cache(cache_path(output))
        if cache is not None and not index._compatible(cache["meta"]):
            cache = None
        if not output.exists() or output.stat().st_size == 0:
            index.source = "empty"
            return index
        if (
            cache is not None
            and not verify
            and cache["meta"].get("fingerprint") == fingerprint(output)
            and index._load_rows(cache)
        ):
            index.source = "cache"
            return index
        index._rebuild(output, cache)
        index.source = "rebuilt"
        return index

    def save(self, output: Path | str) -> None:
        """Write the index next to ``output`` atomically (temporary file + rename)."""
        output = Path(output)
        path = cache_path(output)
        live = [r for r in range(len(self._ids)) if r not in self._dead]
        meta = self._params() | {"fingerprint": fingerprint(output), "count": len(live)}
        arrays: dict[str, np.ndarray] = {
            "ids": np.array([self._ids[r] for r in live], dtype=str),
            "digests": np.array([self._digests[r] for r in live], dtype=np.uint64),
            "sigs": self._sigs[live] if self._dead else self._sigs[: len(self._ids)],
        }
        if self._vectors is not None:
            arrays["vectors"] = self._vectors.matrix()[live]
            blob = None if self._dead else self._vectors.blob()
            if blob is not None:
                arrays["ann"] = blob
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with AtomicFile(path) as fh:
            np.savez(fh, **arrays)

    # -- checking and adding --------------------------------------------------

    def _prepare(self, texts: Sequence[str]) -> list[_Item]:
        norms = [normalize(t) for t in texts]
        sigs = self.hasher.signatures(norms)
        keys = self._band_keys(sigs)
        return [
            _Item(t, text_hash(n), s, k)
            for t, n, s, k in zip(texts, norms, sigs, keys, strict=True)
        ]

    def _prepared_item(self, text: str) -> _Item:
        """``text`` prepared: by an earlier ``check``, or now."""
        item = self._prepared.pop(text, None)
        return item if item is not None else self._prepare([text])[0]

    def _band_keys(self, sigs: np.ndarray) -> list[list[int]]:
        b, r = self.bands, self.rows_per_band
        bands = sigs[:, : b * r].reshape(len(sigs), b, r).astype(np.uint64)
        return (bands * self._band_mult).sum(axis=2, dtype=np.uint64).tolist()

    def _check(
        self, item: _Item, vector: np.ndarray | None = None, *, semantic: bool = True
    ) -> Duplicate | None:
        row = self._exact.get(item.digest)
        if row is not None:
            return Duplicate("exact", self._ids[row], 1.0)
        near = self._near(item)
        if near is not None:
            return Duplicate("near", self._ids[near[0]], near[1])
        if self.embed is None or not semantic:
            return None
        if vector is None:
            vector = self._embed_one(item.text)
        if self._vectors is None:
            return None
        hit = self._vectors.nearest(vector, self._dead)
        if hit is not None and hit[1] >= self.semantic_threshold:
            return Duplicate("semantic", self._ids[hit[0]], hit[1])
        return None

    def _near(self, item: _Item) -> tuple[int, float] | None:
        cands: set[int] = set()
        for table, key in zip(self._tables, item.keys, strict=True):
            hit = table.get(key)
            if hit is None:
                continue
            if type(hit) is int:
                cands.add(hit)
            else:
                cands.update(hit)
        if self._dead:
            cands -= self._dead
        if not cands:
            return None
        rows = np.fromiter(cands, dtype=np.int64, count=len(cands))
        agree = np.count_nonzero(self._sigs[rows] == item.sig, axis=1)
        best = int(np.lexsort((rows, -agree))[0])
        similarity = float(agree[best]) / self.num_perm
        if similarity < self.threshold:
            return None
        return int(rows[best]), similarity

    def _add(self, record_id: str, item: _Item, vector: np.ndarray | None = None) -> None:
        """Insert one row (its vector, if given, into the vector index too)."""
        row = len(self._ids)
        if row == len(self._sigs):
            grown = np.empty((2 * row, self.num_perm), dtype=np.uint32)
            grown[:row] = self._sigs
            self._sigs = grown
        self._sigs[row] = item.sig
        self._ids.append(record_id)
        self._digests.append(item.digest)
        self._exact.setdefault(item.digest, row)
        for table, key in zip(self._tables, item.keys, strict=True):
            hit = table.get(key)
            if hit is None:
                table[key] = row
            elif type(hit) is int:
                table[key] = [hit, row]
            else:
                hit.append(row)
        if vector is not None:
            self._vector_index(len(vector)).add_many([row], vector[None, :])

    def _vector_index(self, dim: int) -> _VectorIndex:
        if self._vectors is None:
            self._vectors = _VectorIndex(dim, self._ann)
        return self._vectors

    def _remove(self, row: int) -> None:
        self._dead.add(row)
        digest = self._digests[row]
        if self._exact.get(digest) == row:
            del self._exact[digest]
            for other in range(row + 1, len(self._ids)):
                if self._digests[other] == digest and other not in self._dead:
                    self._exact[digest] = other
                    break
        if self._vectors is not None:
            self._vectors.remove(row)

    def _check_and_add_batch(self, batch: list[tuple[str, str]]) -> list[Duplicate | None]:
        if not batch:
            return []
        items = self._prepare([text for _, text in batch])
        vectors = self._embed_many([it.text for it in items]) if self.embed else None
        out: list[Duplicate | None] = []
        for i, ((record_id, _), item) in enumerate(zip(batch, items, strict=True)):
            vec = None if vectors is None else vectors[i]
            dup = self._check(item, vec)
            if dup is None:
                self._add(record_id, item, vec)
            out.append(dup)
        return out

    # -- embeddings -----------------------------------------------------------

    def _embed_many(self, texts: list[str]) -> np.ndarray:
        assert self.embed is not None
        return self._unit_vectors(self.embed(texts), len(texts))

    def _unit_vectors(self, raw: Any, count: int) -> np.ndarray:
        """``raw`` (one vector per text, ``count`` texts) checked and normalised."""
        try:
            vecs = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            vecs = np.empty(0, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != count or vecs.shape[1] == 0:
            raise MagpieError(
                "the embedding function did not return one vector of one length per text "
                f"({count} texts, got an array of shape {vecs.shape})"
            )
        if self._vectors is not None and vecs.shape[1] != self._vectors.dim:
            raise MagpieError(
                f"the embedding function returned {vecs.shape[1]}-dimensional vectors, "
                f"the index holds {self._vectors.dim}-dimensional ones"
            )
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.where(norms == 0, 1.0, norms)

    def _embed_one(self, text: str) -> np.ndarray:
        vec = self._embed_cache.get(text)
        if vec is None:
            vec = self._embed_many([text])[0]
            self._cache_embedding(text, vec)
        return vec

    def _cache_embedding(self, text: str, vec: np.ndarray) -> None:
        self._embed_cache[text] = vec
        self._embed_cache.move_to_end(text)
        if len(self._embed_cache) > _EMBED_CACHE:
            self._embed_cache.popitem(last=False)

    # -- persistence ----------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "num_perm": self.num_perm,
            "shingle_size": self.shingle_size,
            "seed": MINHASH_SEED,
            "embed_name": self.embed_name,
        }

    def _compatible(self, meta: dict[str, Any]) -> bool:
        mine = self._params()
        return all(meta.get(k) == mine[k] for k in ("format", "num_perm", "shingle_size", "seed"))

    def _cached_vectors(self, cache: dict[str, Any]) -> np.ndarray | None:
        vecs = cache.get("vectors")
        if self.embed is None or vecs is None or cache["meta"].get("embed_name") != self.embed_name:
            return None
        return vecs

    def _load_rows(self, cache: dict[str, Any]) -> bool:
        """Take the cached rows as they are (False: they lack needed embeddings)."""
        vecs = self._cached_vectors(cache)
        if self.embed is not None and vecs is None and len(cache["ids"]):
            return False
        ids, digests, sigs = cache["ids"], cache["digests"], cache["sigs"]
        for start in range(0, len(ids), BATCH):
            chunk = sigs[start : start + BATCH]
            keys = self._band_keys(chunk)
            for j, digest in enumerate(digests[start : start + BATCH].tolist()):
                self._add(ids[start + j], _Item("", digest, chunk[j], keys[j]))
        if vecs is not None and len(vecs):
            index = self._vector_index(vecs.shape[1])
            index.add_many(range(len(vecs)), vecs, cache.get("ann"))
        return True

    def _rebuild(self, output: Path, cache: dict[str, Any] | None) -> None:
        """Add every record of ``output``, reusing what the cache already computed."""
        known: dict[int, int] = {}
        vecs = None
        if cache is not None:
            known = {d: i for i, d in enumerate(cache["digests"].tolist())}
            vecs = self._cached_vectors(cache)
        batch: list[tuple[str, str]] = []
        for record_id, text in read_instructions(output):
            batch.append((record_id, text))
            if len(batch) >= BATCH:
                self._add_batch(batch, known, cache, vecs)
                batch = []
        self._add_batch(batch, known, cache, vecs)

    def _add_batch(
        self,
        batch: list[tuple[str, str]],
        known: dict[int, int],
        cache: dict[str, Any] | None,
        vecs: np.ndarray | None,
    ) -> None:
        if not batch:
            return
        norms = [normalize(text) for _, text in batch]
        digests = [text_hash(n) for n in norms]
        hits = [known.get(d) for d in digests]
        todo = [i for i, h in enumerate(hits) if h is None]
        sigs = np.empty((len(batch), self.num_perm), dtype=np.uint32)
        if cache is not None and len(todo) < len(batch):
            done = [i for i, h in enumerate(hits) if h is not None]
            sigs[done] = cache["sigs"][[hits[i] for i in done]]
        sigs[todo] = self.hasher.signatures([norms[i] for i in todo])
        keys = self._band_keys(sigs)
        first = len(self._ids)
        for i, (record_id, text) in enumerate(batch):
            self._add(record_id, _Item(text, digests[i], sigs[i], keys[i]))
        if self.embed is None:
            return
        missing = [i for i, h in enumerate(hits) if h is None or vecs is None]
        fresh = self._embed_many([batch[i][1] for i in missing]) if missing else None
        dim = fresh.shape[1] if fresh is not None else vecs.shape[1]  # type: ignore[union-attr]
        vectors = np.empty((len(batch), dim), dtype=np.float32)
        if fresh is not None:
            vectors[missing] = fresh
        if vecs is not None:
            reused = [i for i, h in enumerate(hits) if h is not None]
            vectors[reused] = vecs[[hits[i] for i in reused]]
        self._vector_index(dim).add_many(range(first, first + len(batch)), vectors)
