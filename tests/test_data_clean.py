"""gpt2fast.data.clean: the clean-up and each quality rule, alone and as a pipeline stage."""
from __future__ import annotations

import json
import random

import pytest
from data_testing import doc, word

from gpt2fast.data import PrepareOptions, clean_text, dup_line_share, letter_share, prepare, top_ngram_share, url_host


def test_clean_text_normalises_and_strips_boilerplate():
    text = "Cafe\u0301\r\n\r\n\r\n  Advertisement \r\nOne\t two\u00a0 three  \u200b\n WE USE COOKIES to improve it.\n\n"
    cleaned, removed = clean_text(text)
    assert cleaned == "Caf\u00e9\n\nOne two three"
    assert removed == 2
    assert clean_text("a\n\n\n\nb\n \nc")[0] == "a\n\nb\n\nc"  # one empty line between paragraphs
    assert clean_text("Share this story\n\n© 2019 Example Inc. All rights reserved.")[0] == ""
    assert clean_text("Subscribe to the idea that whales are fish.")[1] == 0  # only whole lines


def test_quality_measures():
    assert letter_share("abc 123") == pytest.approx(0.5)
    assert letter_share("Öl über Straße") == 1.0
    assert dup_line_share("one line\nanother\none line\n\none line") == pytest.approx(16 / 31)
    assert top_ngram_share("a b c a b c x", 3) == pytest.approx(2 * 3 / 7)
    assert top_ngram_share("all different words here", 2) == 0.0
    assert url_host("https://En.Wikipedia.org/wiki/X") == "en.wikipedia.org"
    assert url_host("en.wikipedia.org/wiki/X") == "en.wikipedia.org"
    assert url_host("http://user@host.example.com:8080/p") == "host.example.com"


def test_quality_heuristics_each_drop(tmp_path):
    rng = random.Random(5)
    docs = {
        "few_letters": " ".join(f"{rng.randint(0, 10 ** 6)}" for _ in range(80)),
        "repeated_lines": "\n".join([doc(rng, 12)] * 6 + [doc(rng, 12)]),
        "repeated_ngrams": " ".join(["the same three"] * 30 + [word(rng) for _ in range(30)]),
        "too_long": doc(rng, 2000),
    }
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs.values()), encoding="utf-8")
    manifest = prepare([inp], tmp_path / "out", PrepareOptions(max_chars=5000), log=lambda s: None)
    quality = next(s for s in manifest["stages"] if s["name"] == "quality")
    assert quality["dropped_by"] == {k: 1 for k in docs}
    assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 0
