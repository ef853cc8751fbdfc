"""gpt2fast.data.dedup and its place in prepare: exact duplicates by hash; near duplicates by MinHash LSH over
normalised word shingles, every candidate verified on its shingles, decided in input order.

(The pipeline's dedup counts, on a crafted corpus, are in test_data_prepare.py::test_each_stage_counts.)"""
from __future__ import annotations

import gzip
import itertools
import json
import random

import numpy as np
import pytest
from data_testing import doc, documents, split_tokens, word

from gpt2fast.data import PrepareOptions, clean_text, prepare
from gpt2fast.data.clean import Words, normalize_for_shingles, word_hashes
from gpt2fast.data.dedup import (
    Signer,
    band_pairs,
    collision_probability,
    first_occurrences,
    greedy_drops,
    jaccard,
    lsh_params,
    text_hash,
)
from gpt2fast.tokenizer import Tokenizer


def test_exact_duplicates_are_the_same_cleaned_text():
    rng = random.Random(3)
    a, b = doc(rng), doc(rng)
    same = clean_text(a.replace("\n", "\r\n").replace(" ", "  "))[0]
    keys = np.array([int.from_bytes(text_hash(t), "little") for t in (a, b, same, a + ".")], np.uint64)
    assert first_occurrences(keys).tolist() == [True, True, False, True]
    assert len(text_hash(a)) == 8


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
def test_the_banding_catches_pairs_at_the_threshold(threshold):
    bands, rows = lsh_params(threshold)
    assert bands <= 20
    assert collision_probability(threshold, bands, rows) >= 0.95
    # and not more rows would do (one more row needs more bands than the index allows)
    assert collision_probability(threshold, 20, rows + 1) < 0.95


def test_word_hashes_are_per_word_and_stable():
    words = ["a", "b", "ab", "ba", "é", "e\u0301", "zebra", "zebr", "a" * 300]
    h = word_hashes(words)
    assert len(set(h.tolist())) == len(words)
    assert (word_hashes(list(reversed(words))) == h[::-1]).all()  # a word's hash does not depend on its place
    assert word_hashes(["zebra"]).tolist() == [h[6]]
    ws = Words("The cat, THE cat!")
    assert ws.count == 4 and ws.hashes[0] == ws.hashes[2] and ws.hashes[1] != ws.hashes[3]  # "cat," vs "cat!"


def test_normalisation_is_lower_case_digits_zero_no_punctuation():
    assert normalize_for_shingles("Invoice #4711, due 2026-12-01: PAY NOW!") == "invoice 0000 due 00000000 pay now"
    text = "Order 123 -- shipped; “thanks”, Jane_Doe!"
    assert Words(text).normalized().distinct == Words(normalize_for_shingles(text)).distinct
    assert Words("-- ... !!").normalized().count == 0  # words of punctuation only go


def _brute_force_streaming(sets, threshold):
    """What a streaming index of the kept documents decides, comparing every pair exactly."""
    kept, dropped = [], set()
    for i, s in enumerate(sets):
        if any(jaccard(sets[j], s) >= threshold for j in kept):
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def test_greedy_decisions_are_those_of_a_streaming_index_of_the_kept_documents():
    rng = random.Random(5)
    for trial in range(30):
        n = rng.randint(2, 12)
        universe = list(range(40))
        sets = [np.unique(np.array(rng.sample(universe, rng.randint(5, 30)), np.uint32)) for _ in range(n)]
        for i in range(1, n):  # chains of near-copies, so that decisions depend on earlier decisions
            if rng.random() < 0.6:
                base = sets[rng.randrange(i)].tolist()
                base[rng.randrange(len(base))] = rng.choice(universe)
                sets[i] = np.unique(np.array(base, np.uint32))
        threshold = rng.choice([0.5, 0.7, 0.8])
        edges = np.array([(j, i) for j, i in itertools.combinations(range(n), 2)
                          if jaccard(sets[j], sets[i]) >= threshold], np.int64).reshape(-1, 2)
        assert greedy_drops(edges) == _brute_force_streaming(sets, threshold), trial


def test_band_pairs_are_every_pair_sharing_a_key():
    rng = np.random.default_rng(6)
    keys = rng.integers(0, 7, 60).astype(np.uint32)
    docs = rng.permutation(1000)[:60].astype(np.int64)
    expected = sorted({(min(docs[a], docs[b]), max(docs[a], docs[b])) for a in range(60) for b in range(60)
                       if a != b and keys[a] == keys[b]})
    assert [tuple(p) for p in band_pairs(keys, docs).tolist()] == expected


def _planted(rng, n_bases=300, words=200):
    """Unrelated base documents, then one variant of each with some words replaced: (texts, base of each
    variant, the variant's true Jaccard with its base on the shingles prepare compares)."""
    signer = Signer(0.8, 5)
    bases = [" ".join(word(rng) for _ in range(words)) + "." for _ in range(n_bases)]
    variants, jaccards = [], []
    for _i, b in enumerate(bases):
        w = b.split(" ")
        for pos in rng.sample(range(len(w)), rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8, 10, 14])):
            w[pos] = word(rng) + "q"
        variants.append(" ".join(w))
        jaccards.append(jaccard(signer.shingles(b), signer.shingles(variants[-1])))
    # distinct marker words, so each kept document can be found in the shards
    texts = [f"Alpha{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)} {t}"
             for i, t in enumerate(bases + variants)]
    return texts, np.array(jaccards)


def _kept_markers(out):
    tok = Tokenizer.gpt2()
    docs = documents(tok, split_tokens(out, "train")) + documents(tok, split_tokens(out, "val"))
    return {d.split(" ", 1)[0] for d in docs}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(8)
    texts, jaccards = _planted(rng)
    root = tmp_path_factory.mktemp("planted")
    path = root / "planted.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path, texts, jaccards


def test_planted_near_duplicates_recall_and_nothing_below_the_threshold(planted, tmp_path):
    path, texts, _ = planted
    m = prepare([path], tmp_path / "out", PrepareOptions(min_chars=50, val_fraction=0.1), log=lambda s: None)
    kept = _kept_markers(tmp_path / "out")
    n = len(texts) // 2
    assert all(t.split(" ", 1)[0] in kept for t in texts[:n])  # every base stays
    removed = np.array([t.split(" ", 1)[0] not in kept for t in texts[n:]])
    marker_j = np.array([jaccard(Signer(0.8, 5).shingles(texts[i]), Signer(0.8, 5).shingles(texts[n + i]))
                         for i in range(n)])
    # the variants' true Jaccard with their base (marker words included) spans the threshold on both sides
    assert (marker_j >= 0.85).sum() > 60 and (marker_j < 0.75).sum() > 60
    assert removed[marker_j >= 0.85].mean() >= 0.95
    assert not removed[marker_j < 0.8].any()  # verified: nothing is removed below the threshold
    near = next(s for s in m["stages"] if s["name"] == "near_dedup")
    assert near["dropped_by"]["near_duplicate"] == removed.sum()
    assert (near["lsh_bands"], near["lsh_rows"]) == lsh_params(0.8)
    assert near["verified_pairs"] == removed.sum() and near["candidate_pairs"] >= near["verified_pairs"]


def test_the_output_depends_on_neither_workers_nor_chunks_nor_partitions(planted, tmp_path, monkeypatch):
    path, _, _ = planted
    opts = dict(min_chars=50, val_fraction=0.1, shard_tokens=5000)
    prepare([path], tmp_path / "a", PrepareOptions(**opts, workers=1), log=lambda s: None)
    prepare([path], tmp_path / "b", PrepareOptions(**opts, workers=2, batch_docs=7, batch_chars=3000),
            log=lambda s: None)
    monkeypatch.setattr("gpt2fast.data.pipeline.ENTRIES_PER_PARTITION", 50)  # many key ranges per band
    prepare([path], tmp_path / "c", PrepareOptions(**opts, workers=2, batch_docs=64), log=lambda s: None)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) > 4
    for other in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for name in names:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (other, name)


def test_templated_documents_differing_in_numbers_are_caught_only_when_normalising(tmp_path):
    rng = random.Random(9)
    body = [word(rng) for _ in range(60)]
    texts = []
    for _k in range(6):  # the same mail, with its numbers and punctuation changed each time
        w = list(body)
        for pos in range(0, 60, 4):
            w[pos] = f"{rng.randint(10000, 99999)}{rng.choice(['.', ',', ':', ''])}"
        texts.append(" ".join(w))
    src = tmp_path / "mail.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    on = prepare([src], tmp_path / "on", PrepareOptions(min_chars=50, min_letter_share=0.3), log=lambda s: None)
    off = prepare([src], tmp_path / "off", PrepareOptions(min_chars=50, min_letter_share=0.3,
                                                          shingle_normalize=False), log=lambda s: None)
    near_on = next(s for s in on["stages"] if s["name"] == "near_dedup")
    near_off = next(s for s in off["stages"] if s["name"] == "near_dedup")
    assert near_on["docs_out"] == 1 and near_on["dropped_by"] == {"near_duplicate": 5}
    assert near_off["docs_out"] == 6 and near_off["dropped_by"] == {}
    assert on["options"]["shingle_normalize"] is True and off["options"]["shingle_normalize"] is False
