"""Corpus -> cleaned, deduplicated, tokenized shards (GPT-2's WebText recipe); and the shard loader.

Command line::

    python -m gpt2fast.data prepare INPUT... --out DIR [options]    # see --help for every option
    python -m gpt2fast.data info DIR                                # funnel, shards, unigram entropy

Inputs are JSON Lines files (a ``text`` field, optionally ``url`` and a quality ``score`` such as Reddit
karma), plain text files (one document each), gzip of either, and folders of them (``gpt2fast.textio``).
With no INPUT, the small corpus shipped in the package is used.

The stages, in order, each counted (documents and UTF-8 bytes in and out):

1. **score**: drop documents whose ``score`` is below ``min_score`` (default 3, WebText's karma rule);
   documents without a score pass.
2. **domain**: drop documents whose URL host is, or ends in ``.`` + , an excluded domain (default
   ``wikipedia.org``, which GPT-2 removed to keep its benchmarks clean); documents without a URL pass.
3. **clean**: Unicode NFC; ``\\r\\n``, ``\\r`` and other line separators become ``\\n``; zero-width
   characters and control characters are removed; inside each line runs of spaces, tabs and other
   Unicode spaces become one space and the ends are stripped; boilerplate lines are removed
   (``BOILERPLATE_LINES``, ``BOILERPLATE_PATTERNS``); runs of empty lines collapse to one (a paragraph
   break is kept: it is real structure the model should see) and leading/trailing empty lines go. A
   document with nothing left is dropped.
4. **quality** heuristics on the cleaned text (the thresholds are options):
   ``min_chars`` (200) / ``max_chars`` (1,000,000) characters; ``min_letter_share`` (0.6): letters over
   non-whitespace characters; ``max_dup_line_share`` (0.3): share of the characters of non-empty lines
   that are in lines repeating an earlier line of the same document (characters, so that a play's
   repeated speaker names do not count like a page of repeated menus); ``max_top_ngram_share`` (0.2):
   share of the document's word characters covered by its most frequent word ``repetition_ngram``-gram
   (3), counted when it occurs more than once (Gopher's repetition rule). Words are the lower-cased,
   whitespace-separated tokens.
5. **exact_dedup**: drop a document whose cleaned text hashes (BLAKE2b, 64 bits) like an earlier kept one.
6. **near_dedup**: datasketch ``MinHashLSH`` over word 5-gram shingles (lower-cased), ``num_perm`` 128,
   Jaccard threshold 0.8: a document that the index finds similar to an earlier kept one is dropped.
7. **tokenize**: GPT-2's BPE (``Tokenizer.gpt2()``) in batches on all cores; each document is preceded by
   ``<|endoftext|>`` (so documents are separated by it, and the first one starts after it, as in GPT-2's
   training data).

Each kept document goes to ``val`` when a hash of (seed, its text) falls below ``val_fraction``, else to
``train``: the split depends on neither the order nor the batching. If ``val_fraction > 0`` and at least two
documents are kept, val gets at least one: while val is empty, the train document with the smallest hash is
held back (its tokens in memory) and goes to val at the end if nothing else did.

Output in ``--out DIR``: ``train_000000.bin``, ..., ``val_000000.bin``, ... (``shard_tokens`` tokens each,
documents may span two shards), ``funnel.png``, and ``manifest.json`` written last. A shard is a 256-byte
header (little-endian int32 magic ``SHARD_MAGIC``, int32 version 1, int64 token count, zeros) followed by
the tokens as little-endian uint16; a vocabulary with ids >= 65536 is refused.

Memory stays flat in the input size: documents are read and processed one at a time and tokenized in
batches of ``batch_docs`` documents or ``batch_chars`` characters, and shards are appended to disk as they
grow. What does grow with the number of *kept* documents is inherent to de-duplication: the exact-dedup
set (an 8-byte hash per document, ~85 bytes with Python's overhead) and the LSH index (9 band keys per
document, each in its own Python set in datasketch's in-memory storage: ~3.4 KB per document, measured).
So ~3.5 KB per kept document: 0.35 GB per 100k documents, ~28 GB for WebText's 8M; beyond what fits, run
near-dedup on partitions of the corpus (or give datasketch a Redis storage backend).

Crash safety: each shard is written under a temporary name (``.train_000000.bin.tmp``, header zeroed
until the end), flushed with fsync and renamed; ``manifest.json`` is written last, atomically, so an
output folder without it is unfinished and the loader refuses it. Re-running with the same options and
inputs on a finished folder is a no-op that says so; re-running on an unfinished one removes what the
earlier run left (its shards and temporary files, nothing else) and rebuilds; ``--force`` rebuilds a
finished one; a finished folder made with other options or inputs is an error that says what differs.

The loader: ``TokenLoader(out_dir, split, batch_size, block_size, seed, rank, world_size)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import numpy as np

from gpt2fast._io import write_atomic
from gpt2fast.textio import Record, default_corpus_path, iter_files, iter_records

PathLike = Union[str, os.PathLike]

SHARD_MAGIC = int.from_bytes(b"G2FS", "little")  # a shard file starts with the bytes "G2FS"
SHARD_VERSION = 1  # version 1: uint16 tokens
HEADER_BYTES = 256
_HEADER = struct.Struct("<iiq")
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16
MANIFEST = "manifest.json"
FUNNEL_PNG = "funnel.png"
MANIFEST_FORMAT = "gpt2fast-shards"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad input, options or output folder for the data pipeline; the message says what to do."""


class ShardError(DataError):
    """A shard file that is not a complete gpt2fast token shard."""


# ============================================================================================ options
@dataclasses.dataclass
class PrepareOptions:
    """Every knob of ``prepare``; the ones marked *output* change the result and are part of the
    fingerprint that decides whether a re-run is a no-op."""
    min_score: Optional[float] = 3.0                 # output; None: no score filter
    exclude_domains: Tuple[str, ...] = ("wikipedia.org",)  # output
    min_chars: int = 200                             # output
    max_chars: int = 1_000_000                       # output
    min_letter_share: float = 0.6                    # output
    max_dup_line_share: float = 0.3                  # output
    max_top_ngram_share: float = 0.2                 # output
    repetition_ngram: int = 3                        # output
    near_dedup: bool = True                          # output
    near_dup_threshold: float = 0.8                  # output
    num_perm: int = 128                              # output
    shingle_words: int = 5                           # output
    val_fraction: float = 0.005                      # output
    seed: int = 1337                                 # output
    shard_tokens: int = 100_000_000                  # output
    num_threads: Optional[int] = None                # tokenizer threads (default: all cores)
    batch_docs: int = 1024                           # documents per tokenizer batch
    batch_chars: int = 8_000_000                     # characters per tokenizer batch

    _NOT_OUTPUT = ("num_threads", "batch_docs", "batch_chars")

    def __post_init__(self):
        self.exclude_domains = tuple(d.strip().lower().lstrip(".") for d in self.exclude_domains if d.strip())
        checks = [
            ("min_chars", self.min_chars >= 0), ("max_chars", self.max_chars >= max(1, self.min_chars)),
            ("min_letter_share", 0 <= self.min_letter_share <= 1),
            ("max_dup_line_share", 0 <= self.max_dup_line_share <= 1),
            ("max_top_ngram_share", 0 <= self.max_top_ngram_share <= 1),
            ("repetition_ngram", self.repetition_ngram >= 1),
            ("near_dup_threshold", 0 < self.near_dup_threshold < 1),
            ("num_perm", self.num_perm >= 2), ("shingle_words", self.shingle_words >= 1),
            ("val_fraction", 0 <= self.val_fraction < 1), ("seed", self.seed >= 0),
            ("shard_tokens", self.shard_tokens >= 1), ("batch_docs", self.batch_docs >= 1),
            ("batch_chars", self.batch_chars >= 1),
            ("num_threads", self.num_threads is None or self.num_threads >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise DataError(f"option {name}={getattr(self, name)!r} is out of range (see `python -m "
                                f"gpt2fast.data prepare --help`)")

    def output_options(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self._NOT_OUTPUT:
            d.pop(k)
        d["exclude_domains"] = list(d["exclude_domains"])
        return d


# ============================================================================================ stages
# Whole lines that are page furniture, not text: compared lower-cased, with surrounding spaces and
# punctuation (". ! : | - – — • * > # [ ] ( )") removed. Kept small on purpose: each entry is a line no
# article, book or post would carry as a line of its own.
BOILERPLATE_LINES = frozenset({
    "advertisement", "advertisements", "sponsored content", "share", "share this", "share this article",
    "share this story", "share this post", "share on facebook", "share on twitter", "tweet",
    "read more", "continue reading", "click here", "skip to content", "skip to main content",
    "subscribe", "sign up for our newsletter", "back to top", "accept cookies", "accept all cookies",
})
# Lines (under 400 characters) that are cookie notices or copyright footers.
BOILERPLATE_PATTERNS = (
    re.compile(r"^(we|this (web)?site|our (web)?site) uses? cookies\b"),
    re.compile(r"^by (continuing to )?(use|using|browse|browsing) (this|our) (web)?site\b.*\bcookies\b"),
    re.compile(r"^(©|\(c\)|copyright)\s.*\ball rights reserved\.?$"),
)
_PUNCT_EDGES = " .!:|-\u2013\u2014\u2022*>#[]()"
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
# Zero-width spaces and BOMs, C0 controls other than tab/newline, DEL, and lone surrogates (which JSON allows).
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\x00-\x08\x0e-\x1f\x7f\ud800-\udfff]")
_HSPACE = re.compile(r"[^\S\n]{2,}|[^\S \n]")  # runs of spaces, and any other space (single spaces stay)
_PATTERN_STARTS = ("w", "t", "o", "b", "\u00a9", "(", "c")


def is_boilerplate(line: str) -> bool:
    """Whether a (whitespace-normalised) line is boilerplate by ``BOILERPLATE_LINES``/``_PATTERNS``."""
    key = line.lower().strip(_PUNCT_EDGES)
    if key in BOILERPLATE_LINES:
        return True
    return (len(key) < 400 and key.startswith(_PATTERN_STARTS)
            and any(p.search(key) for p in BOILERPLATE_PATTERNS))


def clean_text(text: str) -> Tuple[str, int]:
    """The cleaned text (module docstring, stage 3) and the number of boilerplate lines removed."""
    text = unicodedata.normalize("NFC", text)
    text = _HSPACE.sub(" ", _INVISIBLE.sub("", _LINE_BREAKS.sub("\n", text)))
    out: List[str] = []
    removed = 0
    for line in text.split("\n"):
        line = line.strip(" ")
        if line and len(line) < 500 and is_boilerplate(line):
            removed += 1
            continue
        if line or (out and out[-1]):  # one empty line at most between paragraphs
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out), removed


_ASCII_LETTER = np.array([chr(i).isalpha() for i in range(128)])
_ASCII_SPACE = np.array([chr(i).isspace() for i in range(128)])


def letter_share(text: str) -> float:
    """Letters (``str.isalpha``) over non-whitespace characters; 1.0 for a text without any."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    ascii_cp = cp[cp < 128]
    letters = int(_ASCII_LETTER[ascii_cp].sum())
    spaces = int(_ASCII_SPACE[ascii_cp].sum())
    if len(ascii_cp) < len(cp):  # the few distinct other characters, one Python call each
        values, counts = np.unique(cp[cp >= 128], return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            ch = chr(value)
            letters += count if ch.isalpha() else 0
            spaces += count if ch.isspace() else 0
    nonspace = len(cp) - spaces
    return letters / nonspace if nonspace else 1.0


def dup_line_share(text: str) -> float:
    """Share of the characters of non-empty lines that are in lines repeating an earlier line.

    Counted in characters, not lines, so that a play's short repeated speaker names ("HAMLET.") do not
    make it look like a page of repeated menus."""
    seen = set()
    dup = total = 0
    for line in text.split("\n"):
        if line:
            total += len(line)
            if line in seen:
                dup += len(line)
            else:
                seen.add(line)
    return dup / total if total else 0.0


_M64 = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on each element (uint64 arithmetic wraps, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Words:
    """A document's lower-cased, whitespace-separated words, hashed once (BLAKE2b of each distinct word)
    for the repetition rule and the near-duplicate shingles."""

    def __init__(self, text: str):
        words = text.lower().split()
        index: Dict[str, int] = {}
        ids = np.fromiter((index.setdefault(w, len(index)) for w in words), np.int64, len(words))
        lengths = np.fromiter(map(len, index), np.int64, len(index))
        hashes = np.fromiter((int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"),
                                                             digest_size=8).digest(), "little") for w in index),
                             np.uint64, len(index))
        self.count = len(words)
        self.lengths = lengths[ids]
        self.hashes = hashes[ids]

    def ngram_hashes(self, n: int) -> np.ndarray:
        """A 64-bit hash of each run of n consecutive words (one, of all the words, if there are fewer)."""
        n = max(1, min(n, self.count))
        k = self.count - n + 1
        h = np.zeros(max(k, 0), np.uint64)
        for j in range(n):
            h = h * _M64 + self.hashes[j:j + k]
        return _mix64(h)

    def top_ngram_share(self, n: int) -> float:
        """Share of the word characters covered by the most frequent word n-gram, if it occurs twice or
        more (the longest such n-gram if several are as frequent)."""
        if self.count < n:
            return 0.0
        _, inverse, counts = np.unique(self.ngram_hashes(n), return_inverse=True, return_counts=True)
        top = counts.max()
        if top < 2:
            return 0.0
        gram_chars = np.convolve(self.lengths, np.ones(n, np.int64), mode="valid")
        chars = int(gram_chars[counts[inverse] == top].max())
        total = int(self.lengths.sum())
        return min(1.0, top * chars / total) if total else 0.0


def top_ngram_share(text: str, n: int) -> float:
    """``Words(text).top_ngram_share(n)``."""
    return Words(text).top_ngram_share(n)


def quality_problem(text: str, opts: PrepareOptions, words: Optional[Words] = None) -> Optional[str]:
    """The first quality rule ``text`` breaks (a reason key), or None."""
    if len(text) < opts.min_chars:
        return "too_short"
    if len(text) > opts.max_chars:
        return "too_long"
    if letter_share(text) < opts.min_letter_share:
        return "few_letters"
    if dup_line_share(text) > opts.max_dup_line_share:
        return "repeated_lines"
    words = words if words is not None else Words(text)
    if words.top_ngram_share(opts.repetition_ngram) > opts.max_top_ngram_share:
        return "repeated_ngrams"
    return None


def url_host(url: str) -> str:
    """The lower-cased host of ``url`` (a scheme is optional: "en.wikipedia.org/wiki/X" works too)."""
    parts = urlsplit(url if "://" in url else "//" + url.lstrip("/"))
    return (parts.hostname or "").rstrip(".")


def host_excluded(host: str, domains: Sequence[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _split_draw(seed: int, digest: bytes) -> float:
    """A number in [0, 1) from (seed, the text's hash): the same document always lands in the same split."""
    h = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


class _NearDuplicates:
    """datasketch MinHashLSH over word shingles; ``seen(words)`` is True for a near-copy of an earlier
    kept document, and otherwise adds the document to the index.

    Shingles are hashed by ``Words.ngram_hashes`` (vectorised; its top 32 bits feed datasketch's 32-bit
    MinHash scheme) instead of datasketch's per-shingle SHA-1 of the shingle's text: the same sets, ~5x faster."""

    _CHUNK = 4096  # shingles per MinHash update: bounds the (chunk x num_perm) matrix datasketch builds

    def __init__(self, threshold: float, num_perm: int, shingle_words: int):
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self._template = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
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


@dataclasses.dataclass
class _Stage:
    name: str
    label: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_by: Dict[str, int] = dataclasses.field(default_factory=dict)
    extra: Dict[str, int] = dataclasses.field(default_factory=dict)

    def record(self, nbytes_in: int, nbytes_out: Optional[int], reason: Optional[str] = None) -> None:
        """Count one document; ``nbytes_out`` None means it was dropped (for ``reason``)."""
        self.docs_in += 1
        self.bytes_in += nbytes_in
        if nbytes_out is None:
            if reason:
                self.dropped_by[reason] = self.dropped_by.get(reason, 0) + 1
            return
        self.docs_out += 1
        self.bytes_out += nbytes_out

    def as_dict(self) -> dict:
        d = {"name": self.name, "label": self.label, "docs_in": self.docs_in, "docs_out": self.docs_out,
             "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
             "dropped_by": dict(sorted(self.dropped_by.items()))}
        d.update(self.extra)
        return d


# ============================================================================================ shards
def shard_header(num_tokens: int) -> bytes:
    return _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, num_tokens).ljust(HEADER_BYTES, b"\0")


def read_shard_header(path: PathLike) -> int:
    """Validate a shard's header against its size; returns its token count, or raises ShardError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing; prepare the data again (with --force)") from None
    if len(head) < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                         f"prepare the data again (with --force)")
    magic, version, count = _HEADER.unpack_from(head)
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path} is not a gpt2fast token shard: magic {magic:#x}, expected {SHARD_MAGIC:#x} "
                         f"(an unfinished write leaves it 0); prepare the data again (with --force)")
    if version != SHARD_VERSION:
        raise ShardError(f"shard {path} has format version {version}; this gpt2fast reads version "
                         f"{SHARD_VERSION}; prepare the data again with this version")
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise ShardError(f"shard {path} is {'truncated' if size < expected else 'corrupt'}: its header says "
                         f"{count} tokens ({expected} bytes) but the file has {size} bytes; prepare the data "
                         f"again (with --force)")
    return count


def read_shard(path: PathLike) -> np.ndarray:
    """A validated shard's tokens as a read-only uint16 memory map."""
    count = read_shard_header(path)
    if count == 0:
        return np.zeros(0, TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ShardWriter:
    """Appends tokens to ``{split}_{index:06d}.bin`` files of at most ``shard_tokens`` tokens each.

    A shard is written as ``.{name}.tmp`` with a zeroed header, which gets its real values only when the
    shard is complete; then fsync and rename. ``abort()`` removes the temporary file."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: List[dict] = []
        self.documents = 0
        self.max_token = -1
        self._file = None
        self._tmp: Optional[Path] = None
        self._count = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)
        self._count = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        if len(tokens):
            self.max_token = max(self.max_token, int(tokens.max()))
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        while len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        f, tmp = self._file, self._tmp
        f.seek(0)
        f.write(shard_header(self._count))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        digest = hashlib.sha256()
        with open(tmp, "rb") as r:
            for block in iter(lambda: r.read(1 << 20), b""):
                digest.update(block)
        final = self.out_dir / tmp.name[1:-len(".tmp")]
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        self.shards.append({"file": final.name, "tokens": self._count,
                            "bytes": HEADER_BYTES + self._count * TOKEN_DTYPE.itemsize,
                            "sha256": digest.hexdigest()})
        self._tmp, self._count = None, 0

    def close(self) -> None:
        if self._file is not None and self._count:
            self._finish()
        self.abort()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def _check_vocabulary(tokenizer) -> None:
    if tokenizer.n_vocab > MAX_VOCAB:
        raise DataError(f"the tokenizer {tokenizer.name!r} has {tokenizer.n_vocab} tokens, but shards store "
                        f"uint16 ids (< {MAX_VOCAB}); use a vocabulary of at most {MAX_VOCAB} tokens")


def _as_uint16(ids: Sequence[int], tokenizer) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) and (arr.max() >= MAX_VOCAB or arr.min() < 0):
        bad = int(arr.max()) if arr.max() >= MAX_VOCAB else int(arr.min())
        raise DataError(f"token id {bad} from the tokenizer {tokenizer.name!r} does not fit in a uint16 shard "
                        f"(ids must be 0..{MAX_VOCAB - 1}); use a vocabulary of at most {MAX_VOCAB} tokens")
    return arr.astype(TOKEN_DTYPE)


# ============================================================================================ prepare
def _our_files(out_dir: Path) -> List[Path]:
    """What a run of ``prepare`` writes into ``out_dir`` (and nothing else there)."""
    found = []
    for p in out_dir.iterdir():
        n = p.name
        if (re.fullmatch(r"(train|val)_\d{6}\.bin", n) or re.fullmatch(r"\.(train|val)_\d{6}\.bin\.tmp", n)
                or re.fullmatch(rf"\.({re.escape(MANIFEST)}|{re.escape(FUNNEL_PNG)})\..*\.tmp", n)
                or n in (MANIFEST, FUNNEL_PNG)):
            found.append(p)
    return sorted(found)


def _describe_inputs(inputs: Sequence[PathLike]) -> List[dict]:
    files = []
    for f in iter_files(inputs):
        st = f.stat()
        files.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    if not files:
        raise DataError(f"no input files found in {[str(p) for p in inputs]} (folders are searched for "
                        f".txt, .jsonl, .json, .md and their .gz)")
    return files


def _fingerprint(options: dict, inputs: List[dict], tokenizer) -> str:
    blob = json.dumps({"format": MANIFEST_FORMAT, "shard_version": SHARD_VERSION, "options": options,
                       "inputs": inputs, "tokenizer": [tokenizer.name, tokenizer.n_vocab]}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_manifest(out_dir: PathLike) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        hint = " (an unfinished run leaves none)" if out_dir.is_dir() else ""
        raise DataError(f"no {MANIFEST} in {out_dir}{hint}: prepare the data first, "
                        f"`python -m gpt2fast.data prepare INPUT... --out {out_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); prepare the data again with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a gpt2fast data manifest (format {manifest.get('format')!r})"
                        if isinstance(manifest, dict) else f"{path} is not a gpt2fast data manifest")
    return manifest


def _damage(out_dir: Path, manifest: dict) -> Optional[str]:
    """What is wrong with a finished output folder (cheap checks: files, sizes, headers), or None."""
    for split in manifest.get("splits", {}).values():
        for shard in split["shards"]:
            try:
                if read_shard_header(out_dir / shard["file"]) != shard["tokens"]:
                    return f"{shard['file']} holds another token count than the manifest says"
            except ShardError as e:
                return str(e)
    return None


def _differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def prepare(inputs: Sequence[PathLike] = (), out_dir: PathLike = "data", options: Optional[PrepareOptions] = None,
            *, force: bool = False, tokenizer=None, log: Callable[[str], None] = print,
            progress: Optional[bool] = None) -> dict:
    """Run the pipeline (module docstring) from ``inputs`` into ``out_dir``; returns the manifest.

    With no ``inputs``, the small corpus shipped in the package. ``progress``: a progress bar on stderr
    (default: when stderr is a terminal)."""
    options = options or PrepareOptions()
    if tokenizer is None:
        from gpt2fast.tokenizer import Tokenizer

        tokenizer = Tokenizer.gpt2()
    _check_vocabulary(tokenizer)
    inputs = [Path(p) for p in inputs] or [default_corpus_path()]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file; give a folder")
    for p in inputs:
        if p.is_dir() and (out_dir.resolve() == p.resolve() or p.resolve() in out_dir.resolve().parents):
            raise DataError(f"--out {out_dir} is inside the input folder {p}, whose files would be read as input "
                            f"on the next run; choose an output folder outside it")
    input_files = _describe_inputs(inputs)
    out_options = options.output_options()
    fingerprint = _fingerprint(out_options, input_files, tokenizer)

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists() and not force:
        old = read_manifest(out_dir)
        if old.get("fingerprint") == fingerprint:
            damage = _damage(out_dir, old)
            if damage:
                raise DataError(f"{out_dir} was prepared with these options but is damaged ({damage}); "
                                f"pass --force to rebuild it")
            log(f"{out_dir} is already prepared with these options and inputs (manifest from "
                f"{old.get('created')}); nothing to do (--force rebuilds it)")
            return old
        diffs = _differences(old.get("options", {}), out_options, "options.")
        if old.get("inputs") != input_files:
            diffs.append("inputs (files, sizes or modification times)")
        if old.get("tokenizer", {}).get("name") != tokenizer.name:
            diffs.append(f"tokenizer: {old.get('tokenizer', {}).get('name')!r} -> {tokenizer.name!r}")
        raise DataError(f"{out_dir} already holds data prepared differently ({'; '.join(diffs) or 'format'}); "
                        f"pass --force to rebuild it, or choose another --out")
    # Unfinished (or forced): the manifest goes first, so the folder never looks finished while we rebuild.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    leftovers = _our_files(out_dir)
    for p in leftovers:
        p.unlink()
    if leftovers and not force:
        log(f"removed {len(leftovers)} file(s) left in {out_dir} by an unfinished run; rebuilding")

    started = time.time()
    writers = {s: _ShardWriter(out_dir, s, options.shard_tokens) for s in SPLITS}
    try:
        stages = _run_pipeline(inputs, options, tokenizer, writers, progress)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    manifest = {
        "format": MANIFEST_FORMAT,
        "shard_version": SHARD_VERSION,
        "shard_header": {"bytes": HEADER_BYTES, "magic": SHARD_MAGIC, "layout": "<int32 magic, int32 version, "
                                                                                "int64 tokens>, zeros"},
        "dtype": "uint16",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "fingerprint": fingerprint,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.n_vocab, "eot_token": tokenizer.eot_token},
        "options": out_options,
        "inputs": input_files,
        "stages": [s.as_dict() for s in stages],
        "splits": {s: {"documents": w.documents, "tokens": w.tokens, "max_token": w.max_token,
                       "shards": w.shards} for s, w in writers.items()},
        "funnel_plot": FUNNEL_PNG,
    }
    _publish(out_dir / FUNNEL_PNG, _funnel_plot_png(manifest))
    _publish(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    _fsync_dir(out_dir)
    log(funnel_table(manifest))
    log(f"wrote {sum(len(v['shards']) for v in manifest['splits'].values())} shard(s), {FUNNEL_PNG} and {MANIFEST} "
        f"to {out_dir}")
    return manifest


def _run_pipeline(inputs, opts: PrepareOptions, tokenizer, writers: Dict[str, _ShardWriter],
                  progress: Optional[bool]):
    domains = opts.exclude_domains
    stages = {
        "input": _Stage("input", "input documents"),
        "score": _Stage("score", f"quality score >= {opts.min_score:g}" if opts.min_score is not None
                        else "quality score (off)"),
        "domain": _Stage("domain", f"domain not {', '.join(domains)}" if domains else "domain (off)"),
        "clean": _Stage("clean", "clean-up (NFC, whitespace, boilerplate)"),
        "quality": _Stage("quality", "quality heuristics"),
        "exact_dedup": _Stage("exact_dedup", "exact de-duplication"),
        "near_dedup": _Stage("near_dedup", f"near-duplicates (MinHash LSH, J >= {opts.near_dup_threshold:g})"
                             if opts.near_dedup else "near-duplicates (off)"),
        "tokenize": _Stage("tokenize", "tokenized (GPT-2 BPE)"),
    }
    stages["clean"].extra["boilerplate_lines_removed"] = 0
    stages["tokenize"].extra["tokens"] = 0
    seen_exact = set()
    near = _NearDuplicates(opts.near_dup_threshold, opts.num_perm, opts.shingle_words) if opts.near_dedup else None
    eot = tokenizer.eot_token
    if eot >= MAX_VOCAB:
        raise DataError(f"the tokenizer's <|endoftext|> id {eot} does not fit in a uint16 shard")
    held: Optional[tuple] = None  # (draw, tokens) of the train document that goes to val if val stays empty
    batch: List[Tuple[str, int, bytes]] = []
    batch_chars = 0

    def flush_batch():
        nonlocal batch, batch_chars, held
        if not batch:
            return
        ids = tokenizer.encode_ordinary_batch([t for t, _, _ in batch], num_threads=opts.num_threads)
        out = {s: [] for s in SPLITS}
        counts = {s: 0 for s in SPLITS}
        for (_text, nbytes, digest), doc_ids in zip(batch, ids):
            tokens = np.concatenate(([eot], _as_uint16(doc_ids, tokenizer))).astype(TOKEN_DTYPE)
            stages["tokenize"].record(nbytes, nbytes)
            stages["tokenize"].extra["tokens"] += len(tokens)
            draw = _split_draw(opts.seed, digest)
            split = "val" if draw < opts.val_fraction else "train"
            if split == "train" and opts.val_fraction > 0 and writers["val"].documents == 0 and not counts["val"]:
                if held is None or draw < held[0]:
                    tokens, held = (held[1] if held else None), (draw, tokens)
                    if tokens is None:
                        continue
            if split == "val" and held is not None:  # val is no longer empty: the held document is train's
                out["train"].append(held[1])
                counts["train"] += 1
                held = None
            out[split].append(tokens)
            counts[split] += 1
        for s in SPLITS:
            if out[s]:
                writers[s].write(np.concatenate(out[s]), counts[s])
        batch, batch_chars = [], 0

    records = iter_records(inputs)
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        try:
            from tqdm import tqdm

            bar = tqdm(records, unit=" docs", desc="prepare", file=sys.stderr, mininterval=0.5)
            records = bar
        except ImportError:
            pass
    try:
        for rec in records:
            kept = _filter(rec, opts, stages, domains, seen_exact, near)
            if kept is None:
                continue
            text, nbytes, digest = kept
            batch.append(kept)
            batch_chars += len(text)
            if len(batch) >= opts.batch_docs or batch_chars >= opts.batch_chars:
                flush_batch()
                if bar is not None:
                    bar.set_postfix(kept=stages["tokenize"].docs_out, tokens=stages["tokenize"].extra["tokens"])
        flush_batch()
    finally:
        if bar is not None:
            bar.close()
    if held is not None:
        to_val = writers["val"].documents == 0 and writers["train"].documents > 0
        writers["val" if to_val else "train"].write(held[1], 1)
    if opts.val_fraction > 0 and writers["val"].documents == 0 and stages["tokenize"].docs_out:
        print(f"warning: only {stages['tokenize'].docs_out} document kept, so the val split is empty",
              file=sys.stderr)
    return list(stages.values())


def _filter(rec: Record, opts: PrepareOptions, stages: Dict[str, _Stage], domains, seen_exact: set,
            near: Optional[_NearDuplicates]):
    """Run one document through the filtering stages; (clean text, bytes, hash) if it is kept."""
    raw_bytes = len(rec.text.encode("utf-8", "surrogatepass"))
    stages["input"].record(raw_bytes, raw_bytes)
    s = stages["score"]
    if opts.min_score is not None and rec.score is not None and rec.score < opts.min_score:
        return s.record(raw_bytes, None, "low_score")
    s.record(raw_bytes, raw_bytes)
    s = stages["domain"]
    if domains and rec.url and host_excluded(url_host(rec.url), domains):
        return s.record(raw_bytes, None, "excluded_domain")
    s.record(raw_bytes, raw_bytes)
    text, removed = clean_text(rec.text)
    stages["clean"].extra["boilerplate_lines_removed"] += removed
    if not text:
        return stages["clean"].record(raw_bytes, None, "empty")
    nbytes = len(text.encode("utf-8"))
    stages["clean"].record(raw_bytes, nbytes)
    words = Words(text)
    problem = quality_problem(text, opts, words)
    if problem:
        return stages["quality"].record(nbytes, None, problem)
    stages["quality"].record(nbytes, nbytes)
    digest = _text_hash(text)
    if digest in seen_exact:
        return stages["exact_dedup"].record(nbytes, None, "duplicate")
    seen_exact.add(digest)
    stages["exact_dedup"].record(nbytes, nbytes)
    if near is not None and near.seen(words):
        return stages["near_dedup"].record(nbytes, None, "near_duplicate")
    stages["near_dedup"].record(nbytes, nbytes)
    return text, nbytes, digest


# ============================================================================================ reports
def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def funnel_table(manifest: dict) -> str:
    """The stage counts as a text table, and the splits below it."""
    rows = [("stage", "docs in", "docs out", "kept %", "MB in", "MB out", "dropped because")]
    for st in manifest["stages"]:
        kept = f"{100 * st['docs_out'] / st['docs_in']:.1f}" if st["docs_in"] else "-"
        why = ", ".join(f"{k} {v:,}" for k, v in st.get("dropped_by", {}).items())
        if st.get("boilerplate_lines_removed"):
            why = (why + ", " if why else "") + f"({st['boilerplate_lines_removed']:,} boilerplate lines cut)"
        if "tokens" in st:
            why = f"{st['tokens']:,} tokens"
        rows.append((st["label"], f"{st['docs_in']:,}", f"{st['docs_out']:,}", kept, _mb(st["bytes_in"]),
                     _mb(st["bytes_out"]), why))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    for name, sp in manifest["splits"].items():
        lines.append(f"{name}: {sp['documents']:,} documents, {sp['tokens']:,} tokens in {len(sp['shards'])} "
                     f"shard(s)")
    return "\n".join(lines)


def _publish(path: Path, data: bytes) -> None:
    """``write_atomic``, then the permissions a plainly created file would get (its temporary file is 0600)."""
    write_atomic(path, data)
    os.chmod(path, path.parent.stat().st_mode & 0o666)


def _funnel_plot_png(manifest: dict) -> bytes:
    """Horizontal bars, one per stage: documents and MB kept, like the WebText pipeline picture."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    stages = manifest["stages"]
    labels = [s["label"] for s in stages]
    docs = [s["docs_out"] for s in stages]
    top_bytes = max(s["bytes_out"] for s in stages)
    scale, unit = next((f, u) for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "bytes"))
                       if top_bytes >= f or f == 1)
    sizes = [s["bytes_out"] / scale for s in stages]
    fig = Figure(figsize=(11, 0.45 * len(stages) + 1.6))
    ax_docs, ax_mb = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(stages))[::-1]
    for ax, values, title, fmt, colour in ((ax_docs, docs, "documents kept", "{:,.0f}", "#4c72b0"),
                                           (ax_mb, sizes, f"{unit} of text kept", "{:,.2f}", "#dd8452")):
        ax.barh(y, values, color=colour)
        top = max(values) if values and max(values) > 0 else 1
        ax.set_xlim(0, top * 1.25)
        for yi, v in zip(y, values):
            ax.text(v + top * 0.01, yi, fmt.format(v), va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    ax_docs.set_yticks(y)
    ax_docs.set_yticklabels(labels, fontsize=8)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    fig.suptitle(f"gpt2fast data pipeline: {stages[-1].get('tokens', 0):,} tokens "
                 f"(train {train['tokens']:,}, val {val['tokens']:,})", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# ============================================================================================ loading
class ShardDataset:
    """The tokens of one split of a prepared folder, all its shards as one sequence, memory-mapped.

    Every shard's header is checked against its file size and the manifest when opened; ``verify=True``
    also checks the sha256 of each shard (reads every byte)."""

    def __init__(self, out_dir: PathLike, split: str = "train", *, verify: bool = False):
        self.out_dir = Path(out_dir)
        self.split = split
        self.manifest = read_manifest(self.out_dir)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise DataError(f"{self.out_dir} has no split {split!r}; it has {sorted(splits)}")
        self._shards: List[np.ndarray] = []
        for shard in splits[split]["shards"]:
            path = self.out_dir / shard["file"]
            tokens = read_shard(path)
            if len(tokens) != shard["tokens"]:
                raise ShardError(f"shard {path} holds {len(tokens)} tokens but {MANIFEST} says {shard['tokens']}; "
                                 f"prepare the data again (with --force)")
            if verify:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest != shard["sha256"]:
                    raise ShardError(f"shard {path} has sha256 {digest}, but {MANIFEST} says {shard['sha256']}: "
                                     f"the file changed since it was written; prepare the data again (with --force)")
            if len(tokens):
                self._shards.append(tokens)
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.num_tokens = int(self._starts[-1])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.eot_token = int(self.manifest["tokenizer"]["eot_token"])
        self.max_token = int(splits[split].get("max_token", -1))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as a uint16 array, across shard boundaries if need be."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside 0..{self.num_tokens}")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while length > 0:
            offset = start - int(self._starts[i])
            part = self._shards[i][offset:offset + length]
            parts.append(part)
            start += len(part)
            length -= len(part)
            i += 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def chunks(self, size: int = 1 << 24):
        """The tokens in order, ``size`` at a time (for statistics over the whole split)."""
        for shard in self._shards:
            for i in range(0, len(shard), size):
                yield shard[i:i + size]


class TokenLoader:
    """Batches of (x, y) int64 tensors of shape (batch_size, block_size), y = x shifted by one token.

    How windows are drawn: the split is cut into non-overlapping windows of ``block_size + 1`` tokens;
    every epoch moves the cut by a random offset and shuffles the windows (both drawn from ``seed`` and
    the epoch number), so each token is seen about once per epoch, at a different position each time.
    Step k takes the global windows ``[k*G, (k+1)*G)`` of that sequence, ``G = batch_size * world_size``,
    and ``rank`` takes rows ``[rank*batch_size, (rank+1)*batch_size)`` of it: ranks never share a window
    within an epoch, and ``world_size`` ranks together see exactly the batches one process with
    ``batch_size * world_size`` would. The shuffled order of one epoch is kept in memory
    (4 bytes per window).

    ``state_dict()`` is the global position; ``load_state_dict`` resumes so that the next batch is the one
    an uninterrupted loader would have given (and, if batch_size or world_size changed, the stream goes on
    from the same global window)."""

    def __init__(self, out_dir: PathLike, split: str = "train", batch_size: int = 8, block_size: int = 1024,
                 seed: int = 0, rank: int = 0, world_size: int = 1, *, dataset: Optional[ShardDataset] = None):
        for name, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1), ("seed", seed, 0),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        self.dataset = dataset if dataset is not None else ShardDataset(out_dir, split)
        self.split, self.batch_size, self.block_size = split, int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        n, span = self.dataset.num_tokens, self.block_size + 1
        if n < span:
            raise DataError(f"the {split!r} split of {self.dataset.out_dir} has {n:,} tokens, fewer than "
                            f"block_size + 1 = {span:,}: use a smaller block_size (context) or more data")
        self.windows_per_epoch = n // span - 1 if n >= 2 * span else 1
        self._max_offset = n - self.windows_per_epoch * span
        self.position = 0  # global index of the next window to draw
        self._epochs: Dict[int, Tuple[int, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> Tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            offset = int(rng.integers(0, self._max_offset + 1))
            order = rng.permutation(self.windows_per_epoch).astype(np.uint32 if self.windows_per_epoch < 2 ** 32
                                                                   else np.int64)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (offset, order)
        return self._epochs[epoch]

    def window_starts(self) -> np.ndarray:
        """Token offsets of this rank's windows in the next batch (without drawing it)."""
        first = self.position + self.rank * self.batch_size
        starts = np.empty(self.batch_size, np.int64)
        for j in range(self.batch_size):
            epoch, index = divmod(first + j, self.windows_per_epoch)
            offset, order = self._epoch(epoch)
            starts[j] = offset + int(order[index]) * (self.block_size + 1)
        return starts

    def next_batch(self):
        import torch

        span = self.block_size + 1
        windows = np.stack([self.dataset.read(int(s), span) for s in self.window_starts()]).astype(np.int64)
        self.position += self.batch_size * self.world_size
        t = torch.from_numpy(windows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    @property
    def epoch(self) -> float:
        """Epochs drawn so far (fractional)."""
        return self.position / self.windows_per_epoch

    def state_dict(self) -> dict:
        return {"kind": "gpt2fast.data.TokenLoader", "version": 1, "split": self.split, "seed": self.seed,
                "block_size": self.block_size, "num_tokens": self.dataset.num_tokens, "position": self.position,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "gpt2fast.data.TokenLoader":
            raise ValueError(f"not a TokenLoader state: {state!r:.200}")
        mine = {"split": self.split, "seed": self.seed, "block_size": self.block_size,
                "num_tokens": self.dataset.num_tokens}
        mismatched = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if mismatched:
            raise ValueError("cannot resume this loader from a state saved with other data or settings: "
                             + "; ".join(mismatched))
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"TokenLoader state has a bad position {position!r}")
        self.position = position


def unigram_entropy(out_dir: PathLike, split: str = "val", unit: str = "nats") -> float:
    """The entropy of the split's token frequencies, per token: ``-sum p log p`` over the token ids, with
    ``p`` each id's share of the split's tokens (``<|endoftext|>`` included).

    In nats by default (``unit="bits"`` for bits), the unit of PyTorch's cross-entropy loss. It is the
    lowest loss any model that ignores context (a fixed distribution over tokens) can reach on this very
    split, so a validation loss below it shows the model learned more than word frequencies."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    ds = ShardDataset(out_dir, split)
    if ds.num_tokens == 0:
        raise DataError(f"the {split!r} split of {out_dir} has no tokens")
    counts = np.zeros(MAX_VOCAB, np.int64)
    for chunk in ds.chunks():
        counts += np.bincount(chunk, minlength=MAX_VOCAB)
    p = counts[counts > 0] / ds.num_tokens
    h = float(-(p * np.log(p)).sum())
    return h / math.log(2) if unit == "bits" else h


# ============================================================================================ CLI
def _build_parser() -> argparse.ArgumentParser:
    d = PrepareOptions()
    parser = argparse.ArgumentParser(prog="python -m gpt2fast.data",
                                     description="GPT-2's WebText data recipe: raw text -> token shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="clean, filter, deduplicate and tokenize text into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Stages: score, domain, clean-up, quality, exact and near de-duplication, "
                                   "tokenization. See the docstring of gpt2fast.data for each rule.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", default=argparse.SUPPRESS,
                   help="JSON Lines / text files, .gz of them, or folders (default: the corpus shipped in the "
                        "package)")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS, help="output folder")
    p.add_argument("--min-score", type=float, default=d.min_score,
                   help="drop documents whose 'score' is below this; documents without one pass")
    p.add_argument("--no-score-filter", action="store_true", help="keep documents whatever their score")
    p.add_argument("--exclude-domains", default=",".join(d.exclude_domains),
                   help="comma-separated domains whose hosts (and subdomains) are dropped; '' for none")
    p.add_argument("--min-chars", type=int, default=d.min_chars, help="shortest cleaned document kept")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="longest cleaned document kept")
    p.add_argument("--min-letter-share", type=float, default=d.min_letter_share,
                   help="least share of letters among non-whitespace characters")
    p.add_argument("--max-dup-line-share", type=float, default=d.max_dup_line_share,
                   help="most share of characters in lines that repeat an earlier line")
    p.add_argument("--max-top-ngram-share", type=float, default=d.max_top_ngram_share,
                   help="most share of characters in the most frequent repeated word n-gram")
    p.add_argument("--repetition-ngram", type=int, default=d.repetition_ngram, help="n of that n-gram")
    p.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold,
                   help="Jaccard similarity of word shingles above which a document is a near-duplicate")
    p.add_argument("--no-near-dedup", action="store_true", help="skip near-duplicate removal")
    p.add_argument("--num-perm", type=int, default=d.num_perm, help="MinHash permutations")
    p.add_argument("--shingle-words", type=int, default=d.shingle_words, help="words per shingle")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of documents in the val split (at least one when there are two or more)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the train/val split")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per shard")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="tokenizer threads (all cores if not given)")
    p.add_argument("--batch-docs", type=int, default=d.batch_docs, help="documents per tokenizer batch")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR holds finished output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print a prepared folder's funnel, shards and unigram entropy")
    i.add_argument("out", metavar="DIR")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            options = PrepareOptions(
                min_score=None if args.no_score_filter else args.min_score,
                exclude_domains=tuple(args.exclude_domains.split(",")), min_chars=args.min_chars,
                max_chars=args.max_chars, min_letter_share=args.min_letter_share,
                max_dup_line_share=args.max_dup_line_share, max_top_ngram_share=args.max_top_ngram_share,
                repetition_ngram=args.repetition_ngram, near_dedup=not args.no_near_dedup,
                near_dup_threshold=args.near_dup_threshold, num_perm=args.num_perm,
                shingle_words=args.shingle_words, val_fraction=args.val_fraction, seed=args.seed,
                shard_tokens=args.shard_tokens, num_threads=getattr(args, "threads", None), batch_docs=args.batch_docs)
            prepare(getattr(args, "inputs", []), args.out, options, force=args.force,
                    progress=False if args.no_progress else None)
        else:
            manifest = read_manifest(args.out)
            print(funnel_table(manifest))
            for split, sp in manifest["splits"].items():
                for shard in sp["shards"]:
                    print(f"  {shard['file']}  {shard['tokens']:,} tokens  sha256 {shard['sha256'][:16]}...")
                if sp["tokens"]:
                    print(f"{split} unigram entropy: {unigram_entropy(args.out, split):.4f} nats/token "
                          f"({unigram_entropy(args.out, split, 'bits'):.4f} bits)")
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no manifest was written, so the output folder is marked unfinished; run the same "
              "command again to rebuild it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
