"""gpt2fast.data.dedup: exact duplicates by hash, near duplicates by MinHash LSH over word shingles.

(The pipeline's dedup counts, on a crafted corpus, are in test_data_prepare.py::test_each_stage_counts.)"""
from __future__ import annotations

import random

from data_testing import change_one_word, doc

from gpt2fast.data import Words, clean_text
from gpt2fast.data.dedup import ExactDuplicates, NearDuplicates, text_hash


def test_exact_duplicates_are_the_same_cleaned_text():
    rng = random.Random(3)
    a, b = doc(rng), doc(rng)
    exact = ExactDuplicates()
    assert not exact.seen(text_hash(a)) and not exact.seen(text_hash(b))
    assert exact.seen(text_hash(clean_text(a.replace("\n", "\r\n").replace(" ", "  "))[0]))
    assert not exact.seen(text_hash(a + "."))
    assert len(text_hash(a)) == 8


def test_near_duplicates_are_found_and_distinct_texts_pass():
    rng = random.Random(4)
    originals = [doc(rng, 400) for _ in range(5)]
    near = NearDuplicates(threshold=0.8, num_perm=128, shingle_words=5)
    assert not any(near.seen(Words(t)) for t in originals)  # unrelated texts: all kept
    assert all(near.seen(Words(change_one_word(t))) for t in originals)  # one word changed: all caught
    half = originals[0].split(" ")
    assert not near.seen(Words(" ".join(half[:len(half) // 2] + [w + "x" for w in half[len(half) // 2:]])))
    assert not near.seen(Words("few words"))  # shorter than a shingle: one shingle of all the words
