"""The prepared folder's format: token shards (header + uint16 tokens), the manifest that lists them, and
their readers.

One module for both sides, so the writer and the checks a reader makes of a shard are read together; what a
shard holds is in docs/data.md ("Output"). Every read checks a shard's header and size against the manifest;
the sha256 the manifest records is checked where the bytes are read anyway (``ShardDataset.chunks``) or when
asked (``verify``): hashing every shard on every start would cost a full read of the data."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

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


_AGAIN = "prepare the data again (with --force)"


class ShardError(DataError):
    """A shard file that is not a complete gpt2fast token shard, or not the one the manifest describes."""


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
    except OSError as e:  # a folder in its place, no permission to read it
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}; fix its permissions, or prepare the data "
                         f"again (with --force)") from None
    if len(head) < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                         f"prepare the data again (with --force)")
    magic, version, count = _HEADER.unpack_from(head)
    if magic == SHARD_MAGIC and version == SHARD_VERSION and any(head[_HEADER.size:]):
        raise ShardError(f"shard {path} has a damaged header: bytes {_HEADER.size}-{HEADER_BYTES - 1} must be "
                         f"zero; {_AGAIN}")
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


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file, read a block at a time (memory stays flat whatever the shard's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        digest = file_sha256(tmp)
        final = self.out_dir / tmp.name[1:-len(".tmp")]
        os.replace(tmp, final)
        fsync_dir(self.out_dir)
        self.shards.append({"file": final.name, "tokens": self._count,
                            "bytes": HEADER_BYTES + self._count * TOKEN_DTYPE.itemsize,
                            "sha256": digest})
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
def rebuild_dir(out_dir: PathLike) -> Path:
    """Where ``prepare --force`` builds the new data for ``out_dir``: a sibling, so on the same file system,
    with a fixed name, so that the next run finds what an interrupted rebuild left."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(f".{out_dir.name}.rebuild")


def read_manifest(out_dir: PathLike) -> dict:
    """The manifest of a finished folder (an unfinished one has none: it is written last), checked to have
    every field a reader uses, so that a damaged one or one of another version is a DataError naming it."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file, not a prepared data folder: give the folder that `python -m "
                        f"gpt2fast.data prepare ... --out DIR` wrote")
    if not path.is_file():
        if (rebuild_dir(out_dir) / MANIFEST).is_file():
            hint = (" (a --force rebuild was interrupted while it was being moved in: run the same prepare "
                    "command again to finish it)")
        else:
            hint = " (an unfinished run leaves none)" if out_dir.is_dir() else ""
        raise DataError(f"no {MANIFEST} in {out_dir}{hint}: prepare the data first, "
                        f"`python -m gpt2fast.data prepare INPUT... --out {out_dir}`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); prepare the data again with --force") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; fix its permissions") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = f" (format {manifest.get('format')!r})" if isinstance(manifest, dict) else ""
        raise DataError(f"{path} is not a gpt2fast data manifest{found}; prepare the data into another folder "
                        f"with `python -m gpt2fast.data prepare INPUT... --out DIR`")
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged or from another version of gpt2fast: {problem}; prepare the data "
                        f"again with this version (with --force)")
    return manifest


_SHARD_NAME = re.compile(r"[A-Za-z0-9_]+_\d{6}\.bin")  # a plain name in the folder: no path can sneak in
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_problem(manifest: dict) -> Optional[str]:
    """What a manifest of our format lacks or gets wrong of what readers use, in words; None if nothing."""
    if manifest.get("shard_version") != SHARD_VERSION:
        return (f"its shards are of format version {manifest.get('shard_version')!r}, and this gpt2fast reads "
                f"version {SHARD_VERSION}")
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not all(_is_count(tokenizer.get(k)) for k in ("vocab_size", "eot_token")):
        return "\"tokenizer\" must be an object with integer \"vocab_size\" and \"eot_token\""
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        return "\"stages\" must be a non-empty list"
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("label"), str) or not all(
                _is_count(st.get(k)) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")):
            return (f"\"stages\"[{i}] must be an object with a \"label\" and counts \"docs_in\", \"docs_out\", "
                    f"\"bytes_in\", \"bytes_out\"")
        optional = [st[k] for k in ("tokens", "boilerplate_lines_removed") if k in st]
        if not _counts(st.get("dropped_by", {})) or not all(_is_count(v) for v in optional):
            return f"\"stages\"[{i}] has a count that is not a whole number >= 0"
    unreadable = manifest.get("unreadable", {"records": 0, "by_reason": {}, "files": []})  # absent from older manifests
    if not isinstance(unreadable, dict) or not _is_count(unreadable.get("records")) or not _counts(
            unreadable.get("by_reason")) or not isinstance(unreadable.get("files"), list) or not all(
            isinstance(f, dict) and _counts(f.get("by_reason")) for f in unreadable["files"]):
        return "\"unreadable\" must be an object with \"records\", \"by_reason\" and \"files\""
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "it has no \"splits\" (the object listing each split's shards)"
    for name, split in splits.items():
        if not isinstance(split, dict) or not _is_count(split.get("documents")) or not _is_count(
                split.get("tokens")) or not isinstance(split.get("shards"), list):
            return (f"\"splits\".{name} must be an object with counts \"documents\", \"tokens\" and a list "
                    f"\"shards\"")
        for i, shard in enumerate(split["shards"]):
            where = f"\"splits\".{name}.shards[{i}]"
            if not isinstance(shard, dict):
                return f"{where} must be an object"
            if not isinstance(shard.get("file"), str) or not _SHARD_NAME.fullmatch(shard["file"]):
                return f"{where} has no valid \"file\" (a shard name such as {name}_000000.bin): {shard.get('file')!r}"
            tokens = shard.get("tokens")
            if not _is_count(tokens) or shard.get("bytes") != HEADER_BYTES + tokens * TOKEN_DTYPE.itemsize:
                return f"{where} ({shard['file']}) must give \"tokens\" and the \"bytes\" they take"
            if not isinstance(shard.get("sha256"), str) or not _SHA256.fullmatch(shard["sha256"]):
                return f"{where} ({shard['file']}) has no valid \"sha256\""
        if sum(s["tokens"] for s in split["shards"]) != split["tokens"]:
            return f"\"splits\".{name}.tokens is not the sum of its shards' tokens"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value) -> bool:
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


class ShardDataset:
    """The tokens of one split of a prepared folder, all its shards as one sequence, memory-mapped.

    Every shard's header is checked against its file size and the manifest when opened; ``verify=True``
    also checks the sha256 of each shard (reads every byte), and ``chunks`` checks it as it reads."""

    def __init__(self, out_dir: PathLike, split: str = "train", *, verify: bool = False):
        self.out_dir = Path(out_dir)
        self.split = split
        self.manifest = read_manifest(self.out_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.out_dir} has no split {split!r}; it has {sorted(splits)}: choose one of those")
        self._entries: List[dict] = []  # the manifest's entries of the shards in self._shards
        self._shards: List[np.ndarray] = []
        for shard in splits[split]["shards"]:
            path = self.out_dir / shard["file"]
            tokens = read_shard(path)  # header against the file's size
            if len(tokens) != shard["tokens"]:
                raise ShardError(f"shard {path} holds {len(tokens)} tokens but {MANIFEST} says {shard['tokens']}; "
                                 f"{_AGAIN}")
            if len(tokens):
                self._entries.append(shard)
                self._shards.append(tokens)
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # where each shard begins in the split
        self.num_tokens = int(self._starts[-1])
        if verify:
            self.verify()

    @property
    def shard_files(self) -> List[Path]:
        return [self.out_dir / e["file"] for e in self._entries]

    def verify(self) -> int:
        """Check every shard's sha256 against the manifest (reads every byte); returns the bytes checked."""
        checked = 0
        for entry, path in zip(self._entries, self.shard_files):
            self._check_digest(path, entry, file_sha256(path))
            checked += entry["bytes"]
        return checked

    @staticmethod
    def _check_digest(path: Path, entry: dict, digest: str) -> None:
        if digest != entry["sha256"]:
            raise ShardError(f"shard {path} has sha256 {digest}, but {MANIFEST} says {entry['sha256']}: the file "
                             f"changed since it was written (damaged on disk or in a copy); {_AGAIN}")

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

    def chunks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        """The tokens in order, ``size`` at a time (for statistics over the whole split). Each shard's sha256
        is checked on the way, since every byte is read anyway: a damaged shard raises ShardError once it has
        been read to its end."""
        for entry, path, shard in zip(self._entries, self.shard_files, self._shards):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read(HEADER_BYTES))
            for i in range(0, len(shard), size):
                chunk = shard[i:i + size]
                digest.update(chunk)
                yield chunk
            self._check_digest(path, entry, digest.hexdigest())
