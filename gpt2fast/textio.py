"""Reading raw text: plain files, JSON Lines with a "text" field, gzip of either, and folders of them.

``iter_documents`` gives the texts; ``iter_records`` gives each text with its optional ``url`` and quality
``score`` (JSON Lines fields, e.g. a Reddit link's karma) and where it came from, for the data pipeline.

Input is UTF-8; a byte-order mark at the start of a file (or of a JSON Lines line) is accepted. What cannot be
read is a ``BadRecord``: one JSON Lines line (not JSON, no string "text", a bad "url" or "score", bytes that
are not UTF-8), a whole plain file, or the rest of a damaged gzip. By default the first one is a ``DataError``
naming the file, the line and the fix; given ``on_bad``, each is handed to it and skipped.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from gpt2fast.errors import DataError

PathLike = Union[str, os.PathLike]
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")

# Why a record could not be read (the keys of the data pipeline's counts).
INVALID_JSON = "invalid_json"
NO_TEXT = "no_text"
BAD_FIELD = "bad_field"
UNDECODABLE = "undecodable"
DAMAGED_GZIP = "damaged_gzip"
_FIXES = {
    INVALID_JSON: "fix or remove that line (JSON Lines files hold one JSON object per line)",
    NO_TEXT: "give each line an object with a string \"text\" field",
    BAD_FIELD: "fix that field or remove it",
    UNDECODABLE: "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    DAMAGED_GZIP: "download or compress the file again (`gzip -t FILE` tests it)",
}
# What gzip raises on a damaged file: a bad header or checksum, data cut short, corrupt deflate data.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
# Bytes that are not UTF-8 decode, with errors="surrogateescape", to U+DC80..U+DCFF and to nothing else: a
# valid file never yields these (lone surrogates in JSON come as "\\udc80" escapes, plain ASCII here).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_BOM = "\ufeff"


class FileMissingError(DataError, FileNotFoundError):
    """An input path that does not exist: a DataError for the command lines, and still the
    FileNotFoundError that callers caught before."""


def default_corpus_path() -> Path:
    """The small public-domain corpus shipped inside the package (Moby-Dick)."""
    return Path(str(resources.files("gpt2fast") / "assets" / "mobydick.jsonl.gz"))


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark at the start is dropped (Windows tools write one); surrogateescape: an
    # undecodable byte becomes a marker we find per line, instead of an error that names neither file nor line.
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
        return open(path, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise DataError(f"cannot read the input {path}: {e.strerror or e}; fix its permissions or leave it "
                        f"out") from None


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
            raise FileMissingError(f"no such file or folder: {p}; give existing input files or folders")


@dataclass(frozen=True)
class Record:
    """One document: its text, the optional ``url`` and ``score`` of a JSON Lines record, and ``where``
    it was read ("path" for a plain file, "path:line" for a JSON Lines record)."""
    text: str
    url: Optional[str] = None
    score: Optional[float] = None
    where: str = ""


@dataclass(frozen=True)
class BadRecord:
    """What could not be read, and where: ``line`` is the JSON Lines line (None for a whole plain file),
    ``reason`` one of the constants above, ``detail`` what is wrong, ``nbytes`` the input bytes lost (0 when
    unknown), ``rest_lost`` whether the rest of the file is lost with it (a damaged gzip)."""
    path: Path
    line: Optional[int]
    reason: str
    detail: str
    nbytes: int = 0
    rest_lost: bool = False

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else str(self.path)

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    @property
    def fix(self) -> str:
        return _FIXES[self.reason]

    def error(self) -> DataError:
        return DataError(f"{self}; {self.fix}")


def iter_documents(paths: Iterable[PathLike], on_bad: Optional[Callable[[BadRecord], None]] = None
                   ) -> Iterator[str]:
    """One string per document: each JSON Lines record's "text", or each plain file whole."""
    for record in iter_records(paths, on_bad):
        yield record.text


def iter_records(paths: Iterable[PathLike], on_bad: Optional[Callable[[BadRecord], None]] = None
                 ) -> Iterator[Record]:
    """One ``Record`` per document, in the order ``iter_documents`` gives them.

    JSON Lines records may carry ``url`` (a string or null) and ``score`` (a number, a numeric string, or
    null). What cannot be read is a ``BadRecord``: without ``on_bad`` the first one raises its DataError;
    with it, each is passed to ``on_bad`` (which may raise) and skipped."""
    def bad(b: BadRecord) -> None:
        if on_bad is None:
            raise b.error()
        on_bad(b)

    for path in iter_files(paths):
        with _open_text(path) as f:
            if _is_jsonl(path):
                yield from _jsonl_records(path, f, bad)
            else:
                record = _plain_record(path, f, bad)
                if record is not None:
                    yield record


def _plain_record(path: Path, f, bad: Callable[[BadRecord], None]) -> Optional[Record]:
    """A plain file is one document: it is read whole or not at all."""
    try:
        text = f.read()
    except _GZIP_ERRORS as e:
        bad(BadRecord(path, None, DAMAGED_GZIP, f"damaged gzip ({e}); the whole file is lost", rest_lost=True))
        return None
    problem = _undecodable(text, whole_file=True)
    if problem:
        nbytes = len(text.encode("utf-8", "surrogateescape"))
        bad(BadRecord(path, None, UNDECODABLE, f"{problem}; the whole file is skipped", nbytes))
        return None
    return Record(text, where=str(path))


def _jsonl_records(path: Path, f, bad: Callable[[BadRecord], None]) -> Iterator[Record]:
    line_no = 0
    lines = iter(f)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except _GZIP_ERRORS as e:  # what was read before stays; the rest of the file cannot be reached
            bad(BadRecord(path, line_no + 1, DAMAGED_GZIP, _gzip_damage(e, line_no), rest_lost=True))
            return
        line_no += 1
        if not line.strip():
            continue
        record = _jsonl_record(path, line_no, line.lstrip(_BOM), bad)  # a BOM also starts concatenated files
        if record is not None:
            yield record


def _gzip_damage(e: Exception, lines_read: int) -> str:
    if not lines_read:
        return f"damaged gzip ({e}): nothing could be read from it"
    said = f"damaged gzip ({e}): lines 1-{lines_read} were read, the rest of the file is lost"
    if isinstance(e, EOFError):  # the data stops early: cut short (an interrupted download), or garbled
        return said
    return said + "; the lines read may hold damaged text (its checksum or its data failed only then)"


def _jsonl_record(path: Path, line_no: int, line: str, bad: Callable[[BadRecord], None]) -> Optional[Record]:
    def skip(reason: str, detail: str) -> None:
        bad(BadRecord(path, line_no, reason, detail, len(line.encode("utf-8", "surrogateescape"))))

    problem = _undecodable(line, whole_file=False)
    if problem:
        return skip(UNDECODABLE, problem)
    try:
        record = json.loads(line.rstrip("\r\n"))  # without the newline a cut-off line reads as unterminated
    except json.JSONDecodeError as e:
        return skip(INVALID_JSON, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; nesting beyond the stack
        return skip(INVALID_JSON, f"not valid JSON ({e})")
    if not isinstance(record, dict):
        return skip(NO_TEXT, f"expected an object with a string \"text\" field, got a JSON "
                             f"{type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str):
        got = "no \"text\" field" if "text" not in record else f"\"text\" is {_json_type(text)}"
        return skip(NO_TEXT, f"expected an object with a string \"text\" field, got {got}")
    url, problem = _url_field(record.get("url"))
    score, score_problem = _score_field(record.get("score"))
    if problem or score_problem:
        return skip(BAD_FIELD, problem or score_problem)
    return Record(text, url, score, f"{path}:{line_no}")


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _undecodable(text: str, whole_file: bool) -> Optional[str]:
    """Where ``text`` (decoded with surrogateescape) first holds a byte that is not UTF-8, in words, or None."""
    m = _ESCAPED_BYTE.search(text)
    if m is None:
        return None
    line_start = text.rfind("\n", 0, m.start()) + 1
    column = len(text[line_start:m.start()].encode("utf-8", "surrogateescape")) + 1
    where = f"line {text.count(chr(10), 0, m.start()) + 1}, " if whole_file else ""
    return f"byte 0x{ord(m.group()) - 0xDC00:02x} at {where}byte {column} of the line is not UTF-8"


def _url_field(value):
    if value is None or isinstance(value, str):
        return value or None, None
    return None, f"\"url\" must be a string or null, got {value!r:.100}"


def _score_field(value):
    if value is None:
        return None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            score = float(value)
        except OverflowError:  # an integer beyond a float's range
            return None, f"\"score\" is an integer of {len(str(abs(value)))} digits, beyond a float's range"
    elif isinstance(value, str):
        try:
            score = float(value)
        except ValueError:
            return None, f"\"score\" must be a number, got the string {value!r:.100}"
    else:
        return None, f"\"score\" must be a number or null, got {value!r:.100}"
    if math.isnan(score):
        return None, "\"score\" is NaN; give a number or null"
    return score, None
