"""What the data tests share: a crafted corpus with one record aimed at each stage, prepared once per session.

Test modules load the fixtures with ``pytest_plugins = ["data_testing"]``. They import its helpers first, so
pytest cannot rewrite its asserts; PYTEST_DONT_REWRITE says that is meant (and keeps pytest from warning)."""
from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from gpt2fast.data import PrepareOptions, ShardDataset, prepare
from gpt2fast.tokenizer import EOT

SMALL = dict(val_fraction=0.3, shard_tokens=1000, seed=7)  # several shards per split, both splits non-empty

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fo", "gu", "ho", "ji", "pe", "wa"]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))


def doc(rng: random.Random, n_words: int = 240) -> str:
    """A document of made-up words that passes every quality rule."""
    words = [word(rng) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def change_one_word(text: str) -> str:
    words = text.split(" ")
    words[len(words) // 2] = "zebra"
    return " ".join(words)


def split_tokens(out, split) -> np.ndarray:
    ds = ShardDataset(out, split)
    return ds.read(0, ds.num_tokens)


def documents(tok, tokens: np.ndarray) -> list:
    """The texts of a split's tokens, cut at each <|endoftext|>."""
    text = tok.decode(tokens.tolist())
    assert text.startswith(EOT) or not text
    return text.split(EOT)[1:]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Crafted inputs, each record aimed at one stage, and the cleaned texts that must survive."""
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("corpus")
    a, b, c, d, e, boiler_body = (doc(rng) for _ in range(6))
    boiler_lines = boiler_body.split("\n")
    boiler = "\n".join(boiler_lines[:5] + ["  Advertisement  ", "Share this"] + boiler_lines[5:])
    records = [
        {"text": a, "score": 10, "url": "https://example.com/a"},
        {"text": b},                                                        # no score, no url: passes
        {"text": c, "score": 3, "url": "http://blog.example.org/c"},       # at the threshold: kept
        {"text": doc(rng), "score": 2, "url": "https://example.com/low"},  # low score
        {"text": doc(rng), "score": 50, "url": "https://en.wikipedia.org/wiki/Whale"},  # Wikipedia
        {"text": boiler, "score": "7"},                                     # two boilerplate lines
        {"text": "  \n\t\n \u200b "},                                       # nothing left after clean-up
        {"text": "Too short to keep."},                                     # quality: too short
        {"text": a.replace("\n", "\r\n").replace(" ", "  ")},               # exact duplicate after clean-up
        {"text": change_one_word(a)},                                       # near duplicate
    ]
    jsonl = root / "web.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    plain = root / "d.txt"
    plain.write_text(d + "\n\n\n", encoding="utf-8")
    zipped = root / "e.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": e}) + "\n")
    kept = [a, b, c, "\n".join(boiler_lines), d, e]
    return {"inputs": [jsonl, plain, zipped], "kept": kept, "near": change_one_word(a)}


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    """(folder, manifest) of ``corpus`` prepared with ``SMALL``; tests that damage it work on a copy."""
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    return out, manifest
