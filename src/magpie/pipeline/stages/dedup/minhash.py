"""MinHash signatures of instructions, computed for many texts at once.

The values are those of ``datasketch.MinHash`` with ``scheme="affine32"`` and
the same seed, fed the shingle hashes of :meth:`MinHasher.shingle_hashes` (the
tests check this), but computed with numpy: hashing is the expensive part, and
datasketch's per-document ``update`` loop would take minutes for 100,000
texts.  :func:`lsh_params` picks the LSH bands the index uses.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import numpy as np

DEFAULT_NUM_PERM = 128
DEFAULT_SHINGLE_SIZE = 5
#: Seed of the MinHash permutations (datasketch's default).
MINHASH_SEED = 1
#: LSH band parameters minimise ``0.2 * P(false candidate) + 0.8 * P(missed pair)``:
#: candidates are confirmed with the MinHash estimate anyway, so a missed pair
#: costs more than a false candidate.
LSH_WEIGHTS = (0.2, 0.8)
#: Texts hashed per numpy batch.
BATCH = 1024

_CHARS = 1 << 20  # characters hashed per numpy call (bounds temporary arrays)
_BLOCK = 1024  # shingles per numpy block: 512 KiB at 128 permutations, fits L2 caches
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_FMIX = (np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


def normalize(text: str) -> str:
    """The form two instructions must share to be exact duplicates.

    Unicode NFKC (full-width letters, ligatures), casefold, runs of whitespace
    collapsed to one space, and punctuation and spaces stripped at both ends.
    Punctuation inside the text is kept.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = " ".join(text.split())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(ch: str) -> bool:
    return ch == " " or unicodedata.category(ch).startswith("P")


def text_hash(normalized: str) -> int:
    """A stable 64-bit hash of a normalized text (the exact-duplicate key)."""
    data = normalized.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def lsh_params(
    threshold: float, num_perm: int, weights: tuple[float, float] = LSH_WEIGHTS
) -> tuple[int, int]:
    """Bands ``b`` and rows per band ``r`` (``b * r <= num_perm``) for a threshold.

    Minimises ``weights[0] * FP + weights[1] * FN`` where FP and FN are the
    integrals of the LSH S-curve ``1 - (1 - s**r)**b`` below and above the
    threshold: the criterion of ``datasketch.lsh._optimal_param``, integrated
    numerically with numpy instead of scipy.
    """
    lo = np.linspace(0.0, threshold, 513)
    hi = np.linspace(threshold, 1.0, 513)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = _trapezoid(1.0 - (1.0 - lo**r) ** b, lo)
        fn = _trapezoid((1.0 - hi**r) ** b, hi)
        err = weights[0] * fp + weights[1] * fn
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), float(err[i])
    return best


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((y[:, 1:] + y[:, :-1]) * np.diff(x)).sum(axis=1) / 2.0


class MinHasher:
    """MinHash signatures of character n-grams, many texts per numpy call."""

    def __init__(
        self,
        num_perm: int = DEFAULT_NUM_PERM,
        shingle_size: int = DEFAULT_SHINGLE_SIZE,
        seed: int = MINHASH_SEED,
    ) -> None:
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        # Exactly datasketch's affine32 permutations for this seed.
        gen = np.random.RandomState(seed)
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.permutations = np.array([a, b])
        self._a = np.ascontiguousarray(a)
        self._b = np.ascontiguousarray(b)

    def _pad(self, text: str) -> str:
        k = self.shingle_size
        return text if len(text) >= k else text + "\0" * (k - len(text))

    def _hash_all(self, padded: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of all shingles, and the number of shingles per text."""
        k = self.shingle_size
        lens = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
        cps = np.frombuffer("".join(padded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        cps = cps.astype(np.uint64)
        n = len(cps) - k + 1
        h = cps[:n] * _M1
        for j in range(1, k):
            h += cps[j : n + j]
            h *= _M1
        h ^= h >> np.uint64(29)
        h *= _M2
        h = (h >> np.uint64(32)).astype(np.uint32)
        # Keep the shingles that lie inside one text.
        counts = lens - k + 1
        offsets = np.cumsum(lens) - lens
        firsts = np.cumsum(counts) - counts
        pos = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(offsets - firsts, counts)
        return h[pos], counts

    def shingle_hashes(self, normalized: str) -> np.ndarray:
        """The 32-bit hashes of the character n-grams of one normalized text.

        ``datasketch.MinHash(num_perm, seed, hashfunc=int, scheme="affine32")``
        updated with these values holds the same signature as :meth:`signatures`.
        """
        return self._hash_all([self._pad(normalized)])[0]

    def signatures(self, normalized: Sequence[str]) -> np.ndarray:
        """MinHash signatures, shape ``(len(normalized), num_perm)``, uint32."""
        out = np.empty((len(normalized), self.num_perm), dtype=np.uint32)
        start, chars = 0, 0
        for i, text in enumerate(normalized):  # bound the temporaries of long texts
            chars += len(text)
            if chars > _CHARS and i > start:
                out[start:i] = self._signatures(normalized[start:i])
                start, chars = i, len(text)
        if start < len(normalized):
            out[start:] = self._signatures(normalized[start:])
        return out

    def _signatures(self, normalized: Sequence[str]) -> np.ndarray:
        out = np.empty((len(normalized), self.num_perm), dtype=np.uint32)
        hv, counts = self._hash_all([self._pad(t) for t in normalized])
        # datasketch's affine32: MurmurHash3 finalizer, then a * h + b mod 2**32.
        hv ^= hv >> np.uint32(16)
        hv *= _FMIX[0]
        hv ^= hv >> np.uint32(13)
        hv *= _FMIX[1]
        hv ^= hv >> np.uint32(16)
        ends = np.cumsum(counts)
        starts = ends - counts
        buf = np.empty((min(_BLOCK, len(hv)), self.num_perm), dtype=np.uint32)
        i, n_docs = 0, len(normalized)
        while i < n_docs:
            j = max(i + 1, int(np.searchsorted(ends, starts[i] + _BLOCK, side="right")))
            s0, s1 = int(starts[i]), int(ends[j - 1])
            if s1 - s0 <= _BLOCK:
                blk = self._permute(hv[s0:s1], buf)
                out[i:j] = np.minimum.reduceat(blk, starts[i:j] - s0, axis=0)
            else:  # one long text: a running minimum over blocks
                acc = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
                for s in range(s0, s1, _BLOCK):
                    blk = self._permute(hv[s : min(s1, s + _BLOCK)], buf)
                    np.minimum(acc, blk.min(axis=0), out=acc)
                out[i] = acc
            i = j
        return out

    def _permute(self, hv: np.ndarray, buf: np.ndarray) -> np.ndarray:
        blk = buf[: len(hv)]
        np.multiply(hv[:, None], self._a, out=blk)
        np.add(blk, self._b, out=blk)
        return blk
