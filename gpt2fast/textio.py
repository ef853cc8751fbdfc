"""Reading raw text: plain files, JSON Lines with a "text" field, gzip of either, and folders of them."""
from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")


def default_corpus_path() -> Path:
    """The small public-domain corpus shipped inside the package (Moby-Dick)."""
    return Path(str(resources.files("gpt2fast") / "assets" / "mobydick.jsonl.gz"))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith((".jsonl", ".json"))


def iter_files(paths: Iterable[PathLike]) -> Iterator[Path]:
    """Files named directly, and the text files below folders (sorted, so the order is reproducible)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                base = f.name[:-3] if f.name.endswith(".gz") else f.name
                if f.is_file() and base.endswith(TEXT_SUFFIXES):
                    yield f
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")


def iter_documents(paths: Iterable[PathLike]) -> Iterator[str]:
    """One string per document: each JSON Lines record's "text", or each plain file whole."""
    for path in iter_files(paths):
        with _open_text(path) as f:
            if not _is_jsonl(path):
                yield f.read()
                continue
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}); JSON Lines files need one "
                                     f"object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a string \"text\" field")
                yield record["text"]
