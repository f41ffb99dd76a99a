"""MinHash LSH keys for near-duplicate removal, in numpy.

A document's shingles are its character n-grams (whitespace removed, lowercased), each hashed to
64 bits by a polynomial over the code points. `bands x rows` hash functions h_k(x) =
(a_k x + b_k) mod 2^64 >> 32 (multiply-shift, a_k odd) give the MinHash signature; band j's
`rows` values, hashed with the band number, are the document's j-th LSH key. Two documents
whose shingle sets have Jaccard similarity s share at least one key with probability
1 - (1 - s^rows)^bands.

The keys go through the same "first occurrence wins" deduplication as the exact text hashes
(`dedup.py`), partitioned by key, so no process ever holds the signatures of the corpus. Why not
datasketch: its MinHashLSH index keeps every signature of the corpus in one process (or in
Redis/Cassandra), which is what bounded memory and several nodes rule out; datatrove's
four-stage MinHash is the model followed here, without its framework.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from pangu.config import NearDedupConfig

_WHITESPACE = re.compile(r"\s+")
_BASE = np.uint64(1_000_003)  # of the polynomial shingle hash
_CHUNK = 4096  # shingles hashed at a time: bounds the [functions x shingles] matrix
_SEED = 20210426  # fixed: signatures must agree between processes and runs


class MinHasher:
    def __init__(self, config: NearDedupConfig) -> None:
        self.ngram, self.bands, self.rows = config.ngram, config.bands, config.rows
        rng = np.random.default_rng(_SEED)
        count = self.bands * self.rows
        self._a = rng.integers(1, 2**63, size=count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=count, dtype=np.uint64)
        self._powers = _BASE ** np.arange(self.ngram - 1, -1, -1, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """uint64[bands * rows]: the minimum of each hash function over the shingles."""
        text = _WHITESPACE.sub("", text).lower()
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        n = max(len(points) - self.ngram + 1, 1)
        if len(points) < self.ngram:  # a document shorter than one shingle is its own shingle
            points = np.concatenate([points, np.zeros(self.ngram - len(points), dtype=np.uint64)])
        with np.errstate(over="ignore"):
            shingles = np.zeros(n, dtype=np.uint64)
            for offset, power in enumerate(self._powers):
                shingles += points[offset : offset + n] * power
            signature = np.full(len(self._a), np.iinfo(np.uint64).max, dtype=np.uint64)
            for start in range(0, n, _CHUNK):
                chunk = shingles[None, start : start + _CHUNK]
                hashed = (self._a[:, None] * chunk + self._b[:, None]) >> np.uint64(32)
                np.minimum(signature, hashed.min(axis=1), out=signature)
        return signature

    def keys(self, text: str) -> list[bytes]:
        """One 16-byte LSH key per band."""
        signature = self.signature(text).reshape(self.bands, self.rows)
        return [
            hashlib.blake2b(band.tobytes(), digest_size=16, salt=b"band%d" % j).digest()
            for j, band in enumerate(signature)
        ]
