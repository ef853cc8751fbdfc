"""Which fused backend ("cuda" or "triton") "auto" tries first for each op on a GPU architecture, as measured
on this machine: ``python -m gpt2fast.bench prefer results.json`` writes the file, gpt2fast.ops reads it.

The file is JSON, ``{"format": "gpt2fast-backend-preferences", "archs": {"sm_90": {"attention": "cuda", ...}},
"sources": {"sm_90": "<results file, GPU, date>"}}``, at ``$GPT2FAST_BACKEND_PREFERENCES`` or
``~/.cache/gpt2fast/backend_preferences.json``. No torch here: the benchmark report tool uses it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

FORMAT = "gpt2fast-backend-preferences"
ENV = "GPT2FAST_BACKEND_PREFERENCES"
BACKENDS = ("cuda", "triton")


def path() -> Path:
    chosen = os.environ.get(ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2fast" / "backend_preferences.json"


def load(file: Optional[Path] = None) -> Dict[str, Dict[str, str]]:
    """{arch: {op: backend}} from the file; {} when there is none. A file that is not ours, or is damaged, is
    ignored with a warning rather than stopping the ops (it only orders two working paths)."""
    file = Path(file) if file is not None else path()
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"its format is {data.get('format')!r}, not {FORMAT!r}")
        archs = data["archs"]
        return {arch: {op: b for op, b in ops.items() if b in BACKENDS} for arch, ops in archs.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        import warnings

        warnings.warn(f"gpt2fast: ignoring the backend preferences in {file} ({type(e).__name__}: {e}); rewrite "
                      f"it with `python -m gpt2fast.bench prefer results.json` or delete it", RuntimeWarning)
        return {}


def save(arch: str, preferences: Dict[str, str], source: str, file: Optional[Path] = None) -> Path:
    """Set ``arch``'s preferences (other architectures' entries are kept), written through a temporary file."""
    for op, backend in preferences.items():
        if backend not in BACKENDS:
            raise ValueError(f"backend preference {op}={backend!r}: must be one of {BACKENDS}")
    file = Path(file) if file is not None else path()
    archs: Dict[str, Dict[str, str]] = {}
    sources: Dict[str, str] = {}
    if file.exists():  # keep the other architectures' entries; never overwrite a file that is not ours
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"it is not a {FORMAT} file")
            archs = {a: dict(ops) for a, ops in data["archs"].items()}
            sources = dict(data.get("sources") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{file} exists but cannot be updated ({type(e).__name__}: {e}); move it away, or "
                             f"set {ENV} to another path") from None
    archs[arch] = dict(preferences)
    sources[arch] = source
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    partial.write_text(json.dumps({"format": FORMAT, "archs": archs, "sources": sources}, indent=1) + "\n",
                       encoding="utf-8")
    os.replace(partial, file)
    return file
