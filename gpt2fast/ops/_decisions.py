"""The backend decisions that ``backend="auto"`` measured on this machine, kept on disk between processes.

One JSON file per machine, ``$GPT2FAST_BACKEND_CACHE`` or ``~/.cache/gpt2fast/backend_decisions.json``:

    {"format": "gpt2fast-backend-decisions", "version": 1,
     "decisions": {"<key>": {"backend": "cuda", "ms": {"cuda": 0.21, "triton": 0.25, "torch": 0.40},
                             "measured": "2026-12-01T17:00:00Z"}, ...}}

A key names everything a decision depends on: the GPU, the versions of torch, Triton and gpt2fast (a new
version may change which path is fastest), the op, the dtypes and the shape bucket. ``python -m
gpt2fast.ops.info`` lists the file's decisions. A damaged file, or one that is not ours, is ignored with a
warning (it only orders paths that all work) and never overwritten; deleting the file makes ``auto`` measure
again. Writes are atomic (gpt2fast._io), so a killed process leaves the old file whole.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

from gpt2fast._io import write_atomic

FORMAT = "gpt2fast-backend-decisions"
VERSION = 1
ENV = "GPT2FAST_BACKEND_CACHE"
BACKENDS = ("cuda", "triton", "torch")

_lock = threading.Lock()
_loaded: Optional[Dict[str, dict]] = None  # this process's view of the file, read on first use
_unwritable: set = set()  # files found not to be ours: never written, warned about once


def path() -> Path:
    chosen = os.environ.get(ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2fast" / "backend_decisions.json"


def read(file: Optional[Path] = None) -> Dict[str, dict]:
    """{key: entry} from the file; {} when there is none or it cannot be used (with a warning)."""
    file = Path(file) if file is not None else path()
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"it is not a {FORMAT} file")
        entries = data["decisions"]
        if not isinstance(entries, dict):
            raise TypeError("'decisions' is not an object")
        return {k: e for k, e in entries.items() if isinstance(e, dict) and e.get("backend") in BACKENDS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        if file not in _unwritable:
            _unwritable.add(file)
            warnings.warn(f"gpt2fast: ignoring the backend decisions in {file} ({type(e).__name__}: {e}); "
                          f"backend='auto' measures again and keeps its decisions in memory. Delete the file, "
                          f"or set {ENV} to another path, to have them kept.", RuntimeWarning, stacklevel=2)
        return {}


def lookup(key: str) -> Optional[dict]:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = read()
        return _loaded.get(key)


def peek(key: str) -> Optional[dict]:
    """The decision for ``key`` if this process already knows it; no lock and no file access, so it may be
    called while torch.compile traces or a CUDA graph is captured."""
    loaded = _loaded
    return loaded.get(key) if loaded is not None else None


def record(key: str, entry: dict) -> None:
    """Keep ``entry`` for ``key`` in this process and in the file (merged with what other processes wrote)."""
    global _loaded
    if entry.get("backend") not in BACKENDS:
        raise ValueError(f"backend decision {entry.get('backend')!r}: must be one of {BACKENDS}")
    with _lock:
        if _loaded is None:
            _loaded = read()
        _loaded[key] = entry
        file = path()
        if file in _unwritable:
            return
        merged = dict(read(file)) if file.exists() else {}
        if file in _unwritable:  # read() just found it is not ours
            return
        merged[key] = entry
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(file, (json.dumps({"format": FORMAT, "version": VERSION, "decisions": merged}, indent=1,
                                           sort_keys=True) + "\n").encode("utf-8"))
        except OSError as e:  # a read-only home, a full disk: the decision still holds for this process
            _unwritable.add(file)
            warnings.warn(f"gpt2fast: cannot keep backend decisions in {file} ({e}); they hold for this "
                          f"process only. Set {ENV} to a writable path.", RuntimeWarning, stacklevel=2)


def forget_for_tests() -> None:
    """Drop this process's in-memory view (the next lookup reads the file again)."""
    global _loaded
    with _lock:
        _loaded = None
        _unwritable.clear()
