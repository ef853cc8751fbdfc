"""Plain-Python references for the native tokenizer: the obvious algorithms, slow and easy to check."""
from __future__ import annotations

from collections import Counter

import regex
from conftest import GPT2_PATTERN


def gpt2_byte_order() -> list:
    printable = [b for b in range(256) if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    return printable + [b for b in range(256) if b not in printable]


def split_on_specials(text: str, specials: list) -> list:
    if not specials:
        return [text]
    pattern = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.split(pattern, text)


def train(texts: list, n_ordinary: int, specials: list) -> tuple:
    """Recount every pair at every step; most frequent pair first, ties to the smallest (left, right) id.
    A pair whose bytes are already a token merges into it without a new token."""
    tokens = [bytes([b]) for b in gpt2_byte_order()]
    index = {t: i for i, t in enumerate(tokens)}
    words = Counter()
    for text in texts:
        for segment in split_on_specials(text, specials):
            for piece in regex.findall(GPT2_PATTERN, segment):
                words[tuple(index[bytes([b])] for b in piece.encode("utf-8"))] += 1
    words = {w: c for w, c in words.items() if len(w) > 1}
    merges = []
    while len(tokens) < n_ordinary:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        pairs = {p: c for p, c in pairs.items() if c > 0}
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        joined = tokens[best[0]] + tokens[best[1]]
        if joined in index:
            new = index[joined]
        else:
            new = len(tokens)
            tokens.append(joined)
            index[joined] = new
            merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return tokens, merges


def bpe_ranks_merge(piece: bytes, rank_of) -> list:
    """tiktoken's rule: repeatedly join the adjacent pair whose bytes have the lowest rank, leftmost first."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, at = None, None
        for i in range(len(parts) - 1):
            r = rank_of(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return [rank_of(p) for p in parts]
