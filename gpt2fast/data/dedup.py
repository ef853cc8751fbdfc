"""Exact and near de-duplication (stages 5-6 of docs/data.md): each keeps what it has seen, so a document is
compared with every earlier kept one without holding their texts.

datasketch is imported only when near-dedup starts: importing ``gpt2fast.data`` (the trainer does) stays cheap."""
from __future__ import annotations

import hashlib

import numpy as np

from gpt2fast.data.clean import Words


def text_hash(text: str) -> bytes:
    """The 8-byte BLAKE2b digest of ``text``: its identity for exact dedup and for the train/val draw."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class ExactDuplicates:
    """``seen(digest)`` is True for a text hashed like an earlier one, and otherwise remembers it."""

    def __init__(self):
        self._digests = set()

    def seen(self, digest: bytes) -> bool:
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False


class NearDuplicates:
    """datasketch MinHashLSH over word shingles; ``seen(words)`` is True for a near-copy of an earlier
    kept document, and otherwise adds the document to the index.

    Shingles are hashed by ``Words.ngram_hashes`` (vectorised; its top 32 bits feed datasketch's 32-bit
    MinHash scheme) instead of datasketch's per-shingle SHA-1 of the shingle's text: the same sets, ~5x faster."""

    _CHUNK = 4096  # shingles per MinHash update: bounds the (chunk x num_perm) matrix datasketch builds

    def __init__(self, threshold: float, num_perm: int, shingle_words: int):
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self._template = MinHash(num_perm=num_perm, seed=1, hashfunc=int)  # its permutations, made once
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = shingle_words
        self._count = 0

    def minhash(self, words: Words):
        shingles = (words.ngram_hashes(self._n) >> np.uint64(32)).tolist()
        t = self._template
        m = self._MinHash(num_perm=len(t.hashvalues), permutations=t.permutations, scheme=t.scheme, hashfunc=int)
        for i in range(0, len(shingles), self._CHUNK):
            m.update_batch(shingles[i:i + self._CHUNK])
        return m

    def seen(self, words: Words) -> bool:
        m = self.minhash(words)
        if self._lsh.query(m):
            return True
        self._lsh.insert(self._count, m, check_duplication=False)
        self._count += 1
        return False
