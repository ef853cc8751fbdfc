"""File writing that never leaves a half-written file under the final name: the one way every file of ours is
written (vocabularies, model weights, checkpoints, manifests, shards, results); the checksum manifest that lets
a reader tell a damaged file from the one written; and telling a full disk from other write errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Union

from gpt2fast.errors import DataError, InputError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors, numpy): when the
    block ends without an exception the file is flushed to disk and renamed over ``path``, and the folder's
    entry is flushed too; on an exception (Ctrl-C, a full disk) it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory: the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ------------------------------------------------------------------------------------------ checksums
# A folder of ours (a checkpoint, a save_pretrained folder) lists the sha256 and size of its files in one small
# JSON manifest, written after them: a reader can tell a file that changed on disk (a flipped bit, a truncation,
# another file copied over it) from the one that was written, and name it.
CHECKSUMS = "checksums.json"
_CHECKSUMS_FORMAT = "gpt2fast checksums"


class ChecksumError(DataError):
    """A file does not match the checksum its folder's manifest recorded when it was written (or the manifest
    itself is unreadable): the file was damaged or replaced after it was written."""


class DiskFullError(InputError):
    """The disk filled up while we wrote a file. Not bad input, but something only the user can fix (free space,
    another folder): reported like an InputError, one line that names the folder, the sizes and the fix."""


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_entry(path: PathLike) -> dict:
    """What the manifest records of one file: its size (so a truncation is named as one) and its sha256."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def read_checksums(folder: PathLike) -> Optional[Dict[str, dict]]:
    """{file name: {"bytes", "sha256"}} from ``folder``'s manifest, or None when it has none. A manifest that
    cannot be read is a ChecksumError naming it."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != _CHECKSUMS_FORMAT:
            return None  # someone else's file of that name: not ours to check against
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("not a gpt2fast checksum manifest")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ChecksumError(f"{path} is damaged ({e}): the checksums of the files beside it cannot be "
                            f"checked") from None
    return files


def write_checksums(folder: PathLike, entries: Dict[str, dict]) -> None:
    """Write ``folder``'s manifest (atomically): ``entries`` as made by checksum_entry, by file name."""
    body = {"format": _CHECKSUMS_FORMAT, "version": 1, "files": dict(sorted(entries.items()))}
    write_atomic(Path(folder) / CHECKSUMS, (json.dumps(body, indent=1) + "\n").encode("utf-8"))


def verify_checksums(folder: PathLike, names: Optional[Iterable[str]] = None) -> Optional[Dict[str, dict]]:
    """Check the files of ``folder`` (those named, else every one) against its manifest; the manifest's
    entries, or None when there is no manifest (nothing to check). A missing, truncated or changed file is a
    ChecksumError that names it. Names the manifest does not list are not checked."""
    folder = Path(folder)
    entries = read_checksums(folder)
    if entries is None:
        return None
    for name in entries if names is None else [n for n in names if n in entries]:
        path, want = folder / name, entries[name]
        if not path.is_file():
            raise ChecksumError(f"{path} is missing: {CHECKSUMS} lists it")
        size = path.stat().st_size
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "longer than written"
            raise ChecksumError(f"{path} is damaged ({what}): it has {size:,} bytes, {CHECKSUMS} recorded "
                                f"{want['bytes']:,}")
        if sha256_file(path) != want["sha256"]:
            raise ChecksumError(f"{path} is damaged: its sha256 differs from the one {CHECKSUMS} recorded when it "
                                f"was written (changed on disk since)")
    return entries


# ------------------------------------------------------------------------------------------ full disks
def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the quota) is full: an OSError with ENOSPC/EDQUOT, or a writer that
    reports it only in words (safetensors: "No space left on device (os error 28)")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(words in text for words in ("No space left on device", "os error 28", "Disk quota exceeded",
                                           "os error 122"))


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk sizes are sold and df -H shows them)."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while abs(n) >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:,.0f} B" if power == 0 else f"{n:,.1f} {units[power]}"
