"""The parallel pieces of ``prepare``: what a worker (a local process or a Ray task) does with one chunk of
documents, and with one partition of the near-dedup band keys.

A chunk is a run of consecutive input records, cut by counts that do not depend on the number of workers.
``map_chunk`` runs the per-document stages (score, domain, clean-up, quality) and everything per document that
dedup and the shards need later (the text hash, the shingles and their set digest, the LSH band keys, the
tokens); it writes the bulky parts (tokens, shingles, band keys) into the work folder, where any machine that
sees the folder can read them, and returns the small ones. ``dedup_partition`` reads one (band, key range)
partition of every chunk's band keys, finds the documents that share a key and keeps the pairs whose shingles
really are near-duplicates. The driver then makes every decision in input order (``pipeline``), so the output
is the same for any number of workers, any partitioning and either engine.

Files in the work folder are plain ``.npy`` arrays, read with ``allow_pickle=False``."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from gpt2fast.data.clean import Words, clean_text, host_excluded, quality_problem, url_host
from gpt2fast.data.dedup import Signer, band_pairs, partition_of, set_digest, text_hash, verified
from gpt2fast.data.options import PrepareOptions
from gpt2fast.data.shards import MAX_VOCAB, TOKEN_DTYPE, as_uint16
from gpt2fast.errors import DataError

WORK_DIR = ".prepare-work"  # inside the folder being built; removed when the run ends, or by the next run
ENTRIES_PER_PARTITION = 1 << 22  # band entries (8 bytes each) one dedup partition holds at most, about


@dataclasses.dataclass
class Context:
    """What every worker needs, set once per worker process (or Ray actor)."""
    opts: PrepareOptions
    tokenizer: object
    work_dir: Path

    @functools.cached_property
    def signer(self) -> Optional[Signer]:
        o = self.opts
        return Signer(o.near_dup_threshold, o.shingle_words, o.shingle_normalize) if o.near_dedup else None


def _stage_counts() -> Dict[str, dict]:
    names = ("input", "score", "domain", "clean", "quality")
    return {n: {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "dropped_by": {}, "extra": {}}
            for n in names}


def _keep(st: dict, nin: int, nout: int) -> None:
    st["docs_in"] += 1
    st["docs_out"] += 1
    st["bytes_in"] += nin
    st["bytes_out"] += nout


def _drop(st: dict, nin: int, reason: str) -> None:
    st["docs_in"] += 1
    st["bytes_in"] += nin
    st["dropped_by"][reason] = st["dropped_by"].get(reason, 0) + 1


def chunk_file(work_dir: Path, chunk: int, what: str) -> Path:
    return work_dir / f"c{chunk:06d}-{what}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # no fsync: a crash restarts the whole run, and the work folder with it
        np.save(f, array, allow_pickle=False)


def map_chunk(ctx: Context, chunk: int, records: List[Tuple[str, Optional[str], Optional[float]]]) -> dict:
    """Stages 1-4 and the per-document parts of 5-7 for one chunk of (text, url, score) records.

    Returns the chunk's stage counts and, for each document that passed the quality rules (in order): its
    position in the chunk, cleaned size, text hash and shingle-set digest (0 without shingles). Writes its
    tokens, shingles and band keys to the work folder."""
    opts, signer = ctx.opts, ctx.signer
    st = _stage_counts()
    boilerplate = 0
    rows, nbytes, digests, set_digests = [], [], [], []
    token_parts, shingle_parts = [], []
    texts = []
    for pos, (raw, url, score) in enumerate(records):
        raw_bytes = len(raw.encode("utf-8", "surrogatepass"))
        _keep(st["input"], raw_bytes, raw_bytes)
        if opts.min_score is not None and score is not None and score < opts.min_score:
            _drop(st["score"], raw_bytes, "low_score")
            continue
        _keep(st["score"], raw_bytes, raw_bytes)
        if opts.exclude_domains and url and host_excluded(url_host(url), opts.exclude_domains):
            _drop(st["domain"], raw_bytes, "excluded_domain")
            continue
        _keep(st["domain"], raw_bytes, raw_bytes)
        text, removed = clean_text(raw)
        boilerplate += removed
        if not text:
            _drop(st["clean"], raw_bytes, "empty")
            continue
        size = len(text.encode("utf-8"))
        _keep(st["clean"], raw_bytes, size)
        words = Words(text)  # hashed once, for the repetition rule (and the shingles when not normalising)
        problem = quality_problem(text, opts, words)
        if problem:
            _drop(st["quality"], size, problem)
            continue
        _keep(st["quality"], size, size)
        rows.append(pos)
        nbytes.append(size)
        digests.append(int.from_bytes(text_hash(text), "little"))
        texts.append(text)
        if signer is not None:
            shingles = signer.shingles(text, words)
            shingle_parts.append(shingles)
            set_digests.append((set_digest(shingles) or 1) if len(shingles) else 0)  # 0: no shingles
    st["clean"]["extra"]["boilerplate_lines_removed"] = boilerplate

    eot = ctx.tokenizer.eot_token
    ids = ctx.tokenizer.encode_ordinary_batch(texts, num_threads=1) if texts else []
    for doc_ids in ids:
        token_parts.append(np.concatenate(([eot], as_uint16(doc_ids, ctx.tokenizer))).astype(TOKEN_DTYPE))
    _save_parts(ctx.work_dir, chunk, "tokens", token_parts, TOKEN_DTYPE)
    if signer is not None:
        _save_parts(ctx.work_dir, chunk, "shingles", shingle_parts, np.uint32)
        # (bands, docs): a band is one contiguous row, so a partition reads only its band
        _save(chunk_file(ctx.work_dir, chunk, "bands"), signer.bands_of(shingle_parts))
    return {"chunk": chunk, "records": len(records), "stages": st, "rows": np.asarray(rows, np.int32),
            "nbytes": np.asarray(nbytes, np.int64), "digests": np.asarray(digests, np.uint64),
            "set_digests": np.asarray(set_digests, np.uint64),
            "tokens": np.asarray([len(t) for t in token_parts], np.int64)}


def _save_parts(work_dir: Path, chunk: int, what: str, parts: List[np.ndarray], dtype) -> None:
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    _save(chunk_file(work_dir, chunk, what), np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    _save(chunk_file(work_dir, chunk, what + "-offsets"), offsets)


def check_eot(tokenizer) -> None:
    if tokenizer.eot_token >= MAX_VOCAB:
        raise DataError(f"the tokenizer's <|endoftext|> id {tokenizer.eot_token} does not fit in a uint16 shard; "
                        f"use a vocabulary of at most {MAX_VOCAB} tokens")


_HEADERS: Dict[Path, Tuple[int, np.dtype]] = {}  # where an .npy file's data starts, and its dtype


def read_slice(path: Path, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the flattened array in an ``.npy`` file, read (not memory-mapped: a mapping
    would keep the pages around it resident too)."""
    with open(path, "rb") as f:
        if path not in _HEADERS:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            _, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            if fortran or dtype.hasobject:
                raise DataError(f"{path} is not a work file of prepare (delete the folder's {WORK_DIR} and run "
                                f"again)")
            if len(_HEADERS) > 4096:
                _HEADERS.clear()
            _HEADERS[path] = (f.tell(), dtype)
        offset, dtype = _HEADERS[path]
        f.seek(offset + start * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=stop - start)


class ChunkReader:
    """Reads the parts of a chunk's saved arrays: one document's tokens or shingles, or all of them."""

    def __init__(self, work_dir: Path, cache: int = 16):
        self.work_dir, self._cache = work_dir, cache
        self._offsets: Dict[Tuple[int, str], np.ndarray] = {}

    def array(self, chunk: int, what: str) -> np.ndarray:
        return np.load(chunk_file(self.work_dir, chunk, what), allow_pickle=False)

    def offsets(self, chunk: int, what: str) -> np.ndarray:
        key = (chunk, what)
        if key not in self._offsets:
            if len(self._offsets) >= self._cache:
                self._offsets.pop(next(iter(self._offsets)))
            self._offsets[key] = self.array(chunk, what + "-offsets")
        return self._offsets[key]

    def part(self, chunk: int, what: str, row: int) -> np.ndarray:
        offsets = self.offsets(chunk, what)
        return read_slice(chunk_file(self.work_dir, chunk, what), int(offsets[row]), int(offsets[row + 1]))


# ---------------------------------------------------------------------------------------- near-dedup partitions
def save_index(work_dir: Path, chunk_rows: np.ndarray, eligible: np.ndarray, global_index: np.ndarray) -> None:
    """What the partitions need of the driver's decisions so far: per chunk, where its quality-passing rows
    start (``chunk_rows``, cumulative, one more than chunks); whether each such row takes part in near dedup
    (``eligible``); and its global document index."""
    _save(work_dir / "index-chunk-rows.npy", chunk_rows)
    _save(work_dir / "index-eligible.npy", eligible)
    _save(work_dir / "index-global.npy", global_index)


def dedup_partition(ctx: Context, band: int, part: int, parts: int) -> Tuple[np.ndarray, int]:
    """The verified near-duplicate pairs (earlier, later global index) among the eligible documents whose key
    in ``band`` falls into key range ``part`` of ``parts``, and the number of candidate pairs checked."""
    w = ctx.work_dir
    chunk_rows = np.load(w / "index-chunk-rows.npy", allow_pickle=False)
    eligible = np.load(w / "index-eligible.npy", mmap_mode="r", allow_pickle=False)
    global_index = np.load(w / "index-global.npy", mmap_mode="r", allow_pickle=False)
    reader = ChunkReader(w)
    keys, docs = [], []
    for c in range(len(chunk_rows) - 1):
        lo, hi = int(chunk_rows[c]), int(chunk_rows[c + 1])
        if lo == hi:
            continue
        e = np.asarray(eligible[lo:hi])
        k = read_slice(chunk_file(w, c, "bands"), band * (hi - lo), (band + 1) * (hi - lo))[e]
        g = np.asarray(global_index[lo:hi])[e]
        if parts > 1:
            mine = partition_of(k, parts) == part
            k, g = k[mine], g[mine]
        keys.append(k)
        docs.append(g)
    if not keys:
        return np.zeros((0, 2), np.int64), 0
    pairs = band_pairs(np.concatenate(keys), np.concatenate(docs))
    if not len(pairs):
        return pairs, 0

    def shingles_of(g: int) -> np.ndarray:
        pos = int(np.searchsorted(global_index, g))
        c = int(np.searchsorted(chunk_rows, pos, side="right")) - 1
        return reader.part(c, "shingles", pos - int(chunk_rows[c]))

    return verified(pairs, shingles_of, ctx.opts.near_dup_threshold), len(pairs)
