"""Reading raw text: plain files, JSON Lines with a "text" field, gzip of either, and folders of them.

``iter_documents`` gives the texts; ``iter_records`` gives each text with its optional ``url`` and quality
``score`` (JSON Lines fields, e.g. a Reddit link's karma) and where it came from, for the data pipeline.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")


def default_corpus_path() -> Path:
    """The small public-domain corpus shipped inside the package (Moby-Dick)."""
    return Path(str(resources.files("gpt2fast") / "assets" / "mobydick.jsonl.gz"))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


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


@dataclass(frozen=True)
class Record:
    """One document: its text, the optional ``url`` and ``score`` of a JSON Lines record, and ``where``
    it was read ("path" for a plain file, "path:line" for a JSON Lines record)."""
    text: str
    url: Optional[str] = None
    score: Optional[float] = None
    where: str = ""


def iter_documents(paths: Iterable[PathLike]) -> Iterator[str]:
    """One string per document: each JSON Lines record's "text", or each plain file whole."""
    for record in iter_records(paths):
        yield record.text


def iter_records(paths: Iterable[PathLike]) -> Iterator[Record]:
    """One ``Record`` per document, in the order ``iter_documents`` gives them.

    JSON Lines records may carry ``url`` (a string or null) and ``score`` (a number, a numeric string, or
    null); anything else there is an error naming the file and line. Plain files have neither."""
    for path in iter_files(paths):
        with _open_text(path) as f:
            if not _is_jsonl(path):
                yield Record(f.read(), where=str(path))
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
                where = f"{path}:{line_no}"
                yield Record(record["text"], _url_field(record.get("url"), where),
                             _score_field(record.get("score"), where), where)


def _url_field(value, where: str) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError(f"{where}: \"url\" must be a string or null, got {value!r}")


def _score_field(value, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        score = float(value)
    elif isinstance(value, str):
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"{where}: \"score\" must be a number, got the string {value!r}") from None
    else:
        raise ValueError(f"{where}: \"score\" must be a number or null, got {value!r}")
    if math.isnan(score):
        raise ValueError(f"{where}: \"score\" is NaN; give a number or null")
    return score
