"""The nearest-neighbour search of semantic dedup: unit vectors by row, searched
with usearch (HNSW) when it is installed, else with numpy (exact)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from magpie.backends.llamacpp.model import settle_cpp_runtime
from magpie.errors import UsageError


class _VectorIndex:
    """Unit vectors by row, with nearest-neighbour search (usearch or numpy)."""

    def __init__(self, dim: int, ann: str = "auto") -> None:
        self.dim = dim
        self._matrix = np.empty((1024, dim), dtype=np.float32)
        self._n = 0
        self._usearch: Any = None
        if ann in ("auto", "usearch"):
            settle_cpp_runtime()  # before usearch's libstdc++ arrives
            try:
                from usearch.index import Index
            except ImportError:
                if ann == "usearch":
                    raise UsageError(
                        "semantic dedup with usearch needs it installed: pip install usearch"
                    ) from None
            else:
                self._usearch = Index(ndim=dim, metric="cos", dtype="f32")

    def add_many(
        self, rows: Iterable[int], vecs: np.ndarray, blob: np.ndarray | None = None
    ) -> None:
        """Store ``vecs`` under consecutive ``rows`` (``blob``: a saved usearch
        graph of exactly these rows, used instead of rebuilding one)."""
        rows = np.fromiter(rows, dtype=np.int64, count=len(vecs))
        end = int(rows[-1]) + 1
        if end > len(self._matrix):
            grown = np.empty((max(2 * len(self._matrix), end), self.dim), dtype=np.float32)
            grown[: self._n] = self._matrix[: self._n]
            self._matrix = grown
        self._matrix[rows] = vecs
        self._n = max(self._n, end)
        if self._usearch is None:
            return
        if blob is not None and self._restore(blob):
            return
        self._usearch.add(rows, vecs)

    def _restore(self, blob: np.ndarray) -> bool:
        from usearch.index import Index

        try:
            restored = Index.restore(blob.tobytes())
        except Exception:  # a damaged graph is rebuilt from the vectors
            return False
        if restored is None or len(restored) != self._n or restored.ndim != self.dim:
            return False
        self._usearch = restored
        return True

    def remove(self, row: int) -> None:
        if self._usearch is not None:
            self._usearch.remove(row)

    def nearest(self, vec: np.ndarray, dead: set[int]) -> tuple[int, float] | None:
        """The most similar live row and its cosine similarity."""
        if self._n == 0:
            return None
        if self._usearch is not None:
            found = self._usearch.search(vec, count=min(8, self._n))
            hits = [
                (int(k), 1.0 - float(d)) for k, d in zip(found.keys, found.distances, strict=True)
            ]
            hits = [h for h in hits if h[0] not in dead]
            return max(hits, key=lambda h: (h[1], -h[0])) if hits else None
        sims = self._matrix[: self._n] @ vec
        if dead:
            sims[list(dead)] = -2.0
        row = int(np.argmax(sims))
        return (row, float(sims[row])) if sims[row] > -2.0 else None

    def matrix(self) -> np.ndarray:
        return self._matrix[: self._n]

    def blob(self) -> np.ndarray | None:
        if self._usearch is None:
            return None
        return np.frombuffer(bytes(self._usearch.save()), dtype=np.uint8)
