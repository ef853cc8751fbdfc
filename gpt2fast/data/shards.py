"""The prepared folder's format: token shards (header + uint16 tokens), the manifest that lists them, and
their readers.

One module for both sides, so the writer and the checks a reader makes of a shard are read together; what a
shard holds is in docs/data.md ("Output")."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from gpt2fast._io import fsync_dir
from gpt2fast.errors import DataError

PathLike = Union[str, os.PathLike]

SHARD_MAGIC = int.from_bytes(b"G2FS", "little")  # a shard file starts with the bytes "G2FS"
SHARD_VERSION = 1  # version 1: uint16 tokens
HEADER_BYTES = 256
_HEADER = struct.Struct("<iiq")  # magic, version, token count; zeros up to HEADER_BYTES
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16
MANIFEST = "manifest.json"
FUNNEL_PNG = "funnel.png"
MANIFEST_FORMAT = "gpt2fast-shards"
SPLITS = ("train", "val")


class ShardError(DataError):
    """A shard file that is not a complete gpt2fast token shard."""


# ---------------------------------------------------------------------------------------- one shard
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


def check_vocabulary(tokenizer) -> None:
    """Refuse a tokenizer whose ids cannot all be stored as uint16."""
    if tokenizer.n_vocab > MAX_VOCAB:
        raise DataError(f"the tokenizer {tokenizer.name!r} has {tokenizer.n_vocab} tokens, but shards store "
                        f"uint16 ids (< {MAX_VOCAB}); use a vocabulary of at most {MAX_VOCAB} tokens")


def as_uint16(ids: Sequence[int], tokenizer) -> np.ndarray:
    """A document's token ids as shard tokens; an id out of the uint16 range is an error, never wrapped."""
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) and (arr.max() >= MAX_VOCAB or arr.min() < 0):
        bad = int(arr.max()) if arr.max() >= MAX_VOCAB else int(arr.min())
        raise DataError(f"token id {bad} from the tokenizer {tokenizer.name!r} does not fit in a uint16 shard "
                        f"(ids must be 0..{MAX_VOCAB - 1}); use a vocabulary of at most {MAX_VOCAB} tokens")
    return arr.astype(TOKEN_DTYPE)


class ShardWriter:
    """Appends tokens to ``{split}_{index:06d}.bin`` files of at most ``shard_tokens`` tokens each.

    A shard grows on disk as ``.{name}.tmp`` (memory stays flat however large the shard) with a zeroed header,
    which gets its real values only when the shard is complete; then fsync and rename, so a file under a
    shard's name is always complete. ``abort()`` removes the temporary file."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: List[dict] = []  # the manifest's entries of the finished shards
        self.documents = 0
        self.max_token = -1
        self._file = None
        self._tmp: Optional[Path] = None
        self._count = 0  # tokens in the open shard

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
        fsync_dir(self.out_dir)
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


# ---------------------------------------------------------------------------------------- a prepared folder
def read_manifest(out_dir: PathLike) -> dict:
    """The manifest of a finished folder (an unfinished one has none: it is written last)."""
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
        found = f" (format {manifest.get('format')!r})" if isinstance(manifest, dict) else ""
        raise DataError(f"{path} is not a gpt2fast data manifest{found}; prepare the data into another folder "
                        f"with `python -m gpt2fast.data prepare INPUT... --out DIR`")
    return manifest


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
            raise DataError(f"{self.out_dir} has no split {split!r}; it has {sorted(splits)}: choose one of those")
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
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # where each shard begins in the split
        self.num_tokens = int(self._starts[-1])

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
