"""Clean-up and quality rules for one document (stages 2-4 of docs/data.md).

Kept apart from the pipeline so each rule can be read, tested and reused on its own; ``Words`` hashes a
document's words once for both the repetition rule here and the near-duplicate shingles in ``dedup``."""
from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import numpy as np

if TYPE_CHECKING:
    from gpt2fast.data.options import PrepareOptions

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
_PATTERN_STARTS = ("w", "t", "o", "b", "\u00a9", "(", "c")  # first letters of the patterns: skips most lines


# ---------------------------------------------------------------------------------------- score and domain
def url_host(url: str) -> str:
    """The lower-cased host of ``url`` (a scheme is optional: "en.wikipedia.org/wiki/X" works too)."""
    parts = urlsplit(url if "://" in url else "//" + url.lstrip("/"))
    return (parts.hostname or "").rstrip(".")


def host_excluded(host: str, domains: Sequence[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one."""
    return any(host == d or host.endswith("." + d) for d in domains)


# ---------------------------------------------------------------------------------------- clean-up
def is_boilerplate(line: str) -> bool:
    """Whether a (whitespace-normalised) line is boilerplate by ``BOILERPLATE_LINES``/``_PATTERNS``."""
    key = line.lower().strip(_PUNCT_EDGES)
    if key in BOILERPLATE_LINES:
        return True
    return (len(key) < 400 and key.startswith(_PATTERN_STARTS)
            and any(p.search(key) for p in BOILERPLATE_PATTERNS))


def clean_text(text: str) -> Tuple[str, int]:
    """The cleaned text (docs/data.md, stage 3) and the number of boilerplate lines removed."""
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


# ---------------------------------------------------------------------------------------- quality
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


_PUNCTUATION = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")


def normalize_for_shingles(text: str) -> str:
    """The text near-dedup compares: lower case, every digit a 0, punctuation (anything neither a word
    character nor a space) dropped. So templated pages that differ only in numbers, dates or punctuation
    shingle alike; the document itself is not changed."""
    return _DIGIT.sub("0", _PUNCTUATION.sub("", text.lower()))


_P = 0x100000001B3  # odd, so invertible modulo 2**64
_Q = pow(_P, -1, 1 << 64)


_POWERS = {}  # base -> base**0, base**1, ... modulo 2**64, grown by doubling as longer texts come


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64 (a view of a shared table: do not write to it)."""
    table = _POWERS.get(base)
    if table is None or len(table) < n:
        size = max(n, 2 * len(table) if table is not None else 1 << 16)
        table = np.full(size, base, np.uint64)
        table[0] = 1
        np.cumprod(table, out=table)
        _POWERS[base] = table
    return table[:n]


def word_hashes(words: List[str]) -> np.ndarray:
    """A 64-bit hash of each word (none may hold a space), all at once: a polynomial hash of its UTF-8 bytes
    (prefix sums over the joined words, so no Python call per word), then SplitMix64's finalizer. The same in
    every process and on every machine."""
    if not words:
        return np.zeros(0, np.uint64)
    buf = np.frombuffer((" ".join(words) + " ").encode("utf-8", "surrogatepass"), np.uint8)
    ends = np.flatnonzero(buf == 32)  # the space after each word
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    n = len(buf)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, np.uint64)
        np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * _powers(_Q, n), out=prefix[1:])
        # sum over the word's bytes b_k of (b_k + 1) * P**(end - 1 - k), by the prefix sums' difference
        h = (prefix[ends] - prefix[starts]) * _powers(_P, n)[ends - 1]
        return _mix64(h ^ ((ends - starts).astype(np.uint64) * _M64))


class Words:
    """A document's lower-cased, whitespace-separated words, hashed once (``word_hashes`` of each distinct
    word) for the repetition rule and the near-duplicate shingles."""

    def __init__(self, text: str):
        words = text.lower().split()
        distinct = list(dict.fromkeys(words))
        position = {w: i for i, w in enumerate(distinct)}
        self._set(distinct, np.fromiter(map(position.__getitem__, words), np.int64, len(words)))

    def _set(self, distinct: List[str], ids: np.ndarray) -> None:
        self.distinct, self.ids = distinct, ids
        self.count = len(ids)
        self.lengths = np.fromiter(map(len, distinct), np.int64, len(distinct))[ids]
        self.hashes = word_hashes(distinct)[ids]

    def normalized(self) -> Words:
        """The words of ``normalize_for_shingles(text)`` (a word left with no character goes), from these
        words' distinct forms rather than from the text again."""
        forms = normalize_for_shingles(" ".join(self.distinct)).split(" ")  # one form per distinct word
        distinct = list(dict.fromkeys(f for f in forms if f))
        position = {w: i for i, w in enumerate(distinct)}
        form_id = np.fromiter((position[f] if f else -1 for f in forms), np.int64, len(forms))
        ids = form_id[self.ids] if self.count else np.zeros(0, np.int64)
        out = Words.__new__(Words)
        out._set(distinct, ids[ids >= 0])
        return out

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
