"""Exact and near de-duplication (stages 5-6 of docs/data.md), in pieces that run apart and merge exactly.

Per document, anywhere (a worker process, a Ray task): ``text_hash`` (exact identity), and ``Signer.sign``:
the normalised text's word shingles (sorted unique 32-bit hashes, kept on disk for verification), their set's
digest, and one 32-bit key per LSH band of its MinHash signature.

Globally, in pieces that never need the whole corpus's index in one place: ``first_occurrences`` (exact
dedup: the first of each hash in input order stays), ``band_pairs`` (one partition of the band keys: the
documents that share a key, as candidate pairs), ``verified`` (each candidate pair's Jaccard on its shingles,
so nothing is removed for a chance collision), and ``greedy_drops`` (the decisions, in input order: a document
goes when an earlier *kept* one is a near-duplicate of it, which is what a streaming LSH index of the kept
documents decides). The banding is chosen by ``lsh_params`` for high recall at the threshold.

MinHash signatures are rensa's (imported on first use): in one call for a whole chunk of documents."""
from __future__ import annotations

import hashlib
import math
from typing import Callable, List, Optional, Tuple

import numpy as np

from gpt2fast.data.clean import Words, _mix64

RECALL_AT_THRESHOLD = 0.95  # least chance that two documents at exactly the threshold share a band
MAX_BANDS = 20  # at most this many 8-byte band entries per document in the dedup index


def text_hash(text: str) -> bytes:
    """The 8-byte BLAKE2b digest of ``text``: its identity for exact dedup and for the train/val draw."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


# ---------------------------------------------------------------------------------------- per document
def lsh_params(threshold: float, recall: float = RECALL_AT_THRESHOLD, max_bands: int = MAX_BANDS) -> Tuple[int, int]:
    """(bands, rows per band) for MinHash LSH: the most rows per band (fewest chance candidates below the
    threshold) whose band count, at most ``max_bands``, still makes two documents at Jaccard ``threshold``
    share a band with probability >= ``recall``."""
    best = None
    for rows in range(1, 64):
        p = threshold ** rows
        bands = 1 if p >= 1 else math.ceil(math.log(1 - recall) / math.log1p(-p))
        if bands > max_bands:
            break
        best = (bands, rows)
    if best is None:  # only at tiny thresholds: one row per band, as many bands as allowed
        best = (max_bands, 1)
    return best


def collision_probability(jaccard: float, bands: int, rows: int) -> float:
    """The chance that two documents at this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


class Signer:
    """Shingles, set digest and band keys of one document (``sign``); the same for any process with the same
    settings, since the MinHash permutations come from a fixed seed."""

    def __init__(self, threshold: float, shingle_words: int, normalize: bool = True):
        from rensa import RMinHash

        self.bands, self.rows = lsh_params(threshold)
        self.num_perm = self.bands * self.rows
        self._RMinHash = RMinHash
        self.shingle_words, self.normalize = shingle_words, normalize
        salt = np.arange(1, self.bands + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
        self._salt = salt  # makes equal rows in different bands different keys

    def shingles(self, text: str, words: Optional[Words] = None) -> np.ndarray:
        """Sorted unique 32-bit hashes of the (normalised) text's word ``shingle_words``-grams; empty for a
        text without words. ``words``: the text's ``Words``, if at hand (reused, not recomputed)."""
        words = words if words is not None else Words(text)
        if self.normalize:
            words = words.normalized()
        if words.count == 0:
            return np.zeros(0, np.uint32)
        return np.unique((words.ngram_hashes(self.shingle_words) >> np.uint64(32)).astype(np.uint32))

    def bands_of(self, shingle_sets: List[np.ndarray]) -> np.ndarray:
        """The LSH band keys of each shingle set, as a (bands, documents) uint32 array: one 32-bit key per
        band of the set's MinHash signature (rensa's, all the sets in one call). An empty set's keys mean
        nothing (callers leave such documents out)."""
        offsets = np.zeros(len(shingle_sets) + 1, np.uint64)
        np.cumsum([len(x) for x in shingle_sets], out=offsets[1:])
        if not shingle_sets:
            return np.zeros((self.bands, 0), np.uint32)
        flat = np.concatenate(shingle_sets).astype(np.uint64)
        digests = self._RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, self.num_perm, 1)
        sig = np.asarray(digests.to_rows(), np.uint64).reshape(len(shingle_sets), self.bands, self.rows)
        h = np.broadcast_to(self._salt, (len(shingle_sets), self.bands)).copy()
        with np.errstate(over="ignore"):
            for j in range(self.rows):
                h = _mix64(h * np.uint64(0x9E3779B97F4A7C15) + sig[:, :, j])
        return np.ascontiguousarray((h >> np.uint64(32)).astype(np.uint32).T)


def set_digest(shingles: np.ndarray) -> int:
    """A 64-bit digest of a shingle set: equal digests are equal sets (Jaccard 1)."""
    return int.from_bytes(hashlib.blake2b(shingles.tobytes(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------- global, in pieces
def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """A boolean mask: True where ``keys[i]`` does not occur in ``keys[:i]``."""
    mask = np.ones(len(keys), bool)
    if len(keys) > 1:
        order = np.argsort(keys, kind="stable")  # equal keys stay in input order: the first comes first
        ordered = keys[order]
        mask[order[1:][ordered[1:] == ordered[:-1]]] = False
    return mask


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Which of ``partitions`` each 32-bit band key belongs to (a pure function of the key)."""
    return ((keys.astype(np.uint64) * np.uint64(0x9E3779B1)) >> np.uint64(16)) % np.uint64(partitions)


def band_pairs(keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The candidate pairs among entries (band key, document): every two documents with an equal key, as rows
    (earlier, later) of an int64 (n, 2) array, sorted and unique. ``docs``: global document indices."""
    packed = keys.astype(np.uint64)  # (key << 32 | document), sorted: one array, 8 bytes an entry
    packed <<= np.uint64(32)
    packed |= docs.astype(np.uint32)
    packed.sort()
    high = (packed >> np.uint64(32)).astype(np.uint32)
    same = high[1:] == high[:-1]
    del high
    if not same.any():
        return np.zeros((0, 2), np.int64)
    starts = np.flatnonzero(np.r_[True, ~same])
    sizes = np.diff(np.r_[starts, len(packed)])
    pairs = []
    for s, k in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        members = (packed[s:s + k] & np.uint64(0xFFFFFFFF)).astype(np.int64)  # the earlier document first
        a, b = np.triu_indices(k, 1)
        pairs.append(np.stack([members[a], members[b]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def verified(pairs: np.ndarray, shingles_of: Callable[[int], np.ndarray], threshold: float) -> np.ndarray:
    """The rows of ``pairs`` whose documents' shingle sets have Jaccard >= ``threshold``."""
    keep = [jaccard(shingles_of(int(j)), shingles_of(int(i))) >= threshold for j, i in pairs.tolist()]
    return pairs[np.asarray(keep, bool)] if len(pairs) else pairs


def greedy_drops(edges: np.ndarray) -> set:
    """The documents near-dedup removes, given the verified near-duplicate ``edges`` (rows (earlier, later)):
    in input order, a document goes when one of its earlier partners stayed."""
    dropped = set()
    if len(edges):
        edges = edges[np.lexsort((edges[:, 0], edges[:, 1]))]  # by the later document
        later = edges[:, 1]
        bounds = np.flatnonzero(np.r_[True, later[1:] != later[:-1], True])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            i = int(later[s])
            if any(int(j) not in dropped for j in edges[s:e, 0].tolist()):
                dropped.add(i)
    return dropped
