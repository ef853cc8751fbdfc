"""gpt2fast.data: the WebText-style pipeline (stages, shards, manifest, crash safety) and the shard loader."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import shutil
import struct

import numpy as np
import pytest
import torch

from gpt2fast import data
from gpt2fast.data import (
    DataError,
    PrepareOptions,
    ShardDataset,
    ShardError,
    TokenLoader,
    clean_text,
    dup_line_share,
    letter_share,
    main,
    prepare,
    read_shard,
    read_shard_header,
    top_ngram_share,
    unigram_entropy,
    url_host,
)
from gpt2fast.tokenizer import EOT

SMALL = dict(val_fraction=0.3, shard_tokens=1000, seed=7)

# ------------------------------------------------------------------------------------------ inputs
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fo", "gu", "ho", "ji", "pe", "wa"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))


def _doc(rng: random.Random, n_words: int = 240) -> str:
    words = [_word(rng) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def _change_one_word(text: str) -> str:
    words = text.split(" ")
    words[len(words) // 2] = "zebra"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Crafted inputs, each record aimed at one stage, and the cleaned texts that must survive."""
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("corpus")
    a, b, c, d, e, boiler_body = (_doc(rng) for _ in range(6))
    boiler_lines = boiler_body.split("\n")
    boiler = "\n".join(boiler_lines[:5] + ["  Advertisement  ", "Share this"] + boiler_lines[5:])
    records = [
        {"text": a, "score": 10, "url": "https://example.com/a"},
        {"text": b},                                                        # no score, no url: passes
        {"text": c, "score": 3, "url": "http://blog.example.org/c"},       # at the threshold: kept
        {"text": _doc(rng), "score": 2, "url": "https://example.com/low"},  # low score
        {"text": _doc(rng), "score": 50, "url": "https://en.wikipedia.org/wiki/Whale"},  # Wikipedia
        {"text": boiler, "score": "7"},                                     # two boilerplate lines
        {"text": "  \n\t\n \u200b "},                                       # nothing left after clean-up
        {"text": "Too short to keep."},                                     # quality: too short
        {"text": a.replace("\n", "\r\n").replace(" ", "  ")},               # exact duplicate after clean-up
        {"text": _change_one_word(a)},                                      # near duplicate
    ]
    jsonl = root / "web.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    plain = root / "d.txt"
    plain.write_text(d + "\n\n\n", encoding="utf-8")
    zipped = root / "e.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": e}) + "\n")
    kept = [a, b, c, "\n".join(boiler_lines), d, e]
    return {"inputs": [jsonl, plain, zipped], "kept": kept, "near": _change_one_word(a)}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    return out, manifest


def _split_tokens(out, split) -> np.ndarray:
    ds = ShardDataset(out, split)
    return ds.read(0, ds.num_tokens)


def _documents(tok, tokens: np.ndarray) -> list:
    text = tok.decode(tokens.tolist())
    assert text.startswith(EOT) or not text
    return text.split(EOT)[1:]


# ------------------------------------------------------------------------------------------ pieces
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
        "repeated_lines": "\n".join([_doc(rng, 12)] * 6 + [_doc(rng, 12)]),
        "repeated_ngrams": " ".join(["the same three"] * 30 + [_word(rng) for _ in range(30)]),
        "too_long": _doc(rng, 2000),
    }
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs.values()), encoding="utf-8")
    manifest = prepare([inp], tmp_path / "out", PrepareOptions(max_chars=5000), log=lambda s: None)
    quality = next(s for s in manifest["stages"] if s["name"] == "quality")
    assert quality["dropped_by"] == {k: 1 for k in docs}
    assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 0


# ------------------------------------------------------------------------------------------ pipeline
def test_each_stage_counts(prepared):
    _, manifest = prepared
    stages = {s["name"]: s for s in manifest["stages"]}
    assert list(stages) == ["input", "score", "domain", "clean", "quality", "exact_dedup", "near_dedup", "tokenize"]
    flow = [(s["docs_in"], s["docs_out"]) for s in stages.values()]
    assert flow == [(12, 12), (12, 11), (11, 10), (10, 9), (9, 8), (8, 7), (7, 6), (6, 6)]
    assert stages["score"]["dropped_by"] == {"low_score": 1}
    assert stages["domain"]["dropped_by"] == {"excluded_domain": 1}
    assert stages["clean"]["dropped_by"] == {"empty": 1}
    assert stages["clean"]["boilerplate_lines_removed"] == 2
    assert stages["quality"]["dropped_by"] == {"too_short": 1}
    assert stages["exact_dedup"]["dropped_by"] == {"duplicate": 1}
    assert stages["near_dedup"]["dropped_by"] == {"near_duplicate": 1}
    for before, after in zip(manifest["stages"], manifest["stages"][1:]):
        assert after["docs_in"] == before["docs_out"] and after["bytes_in"] == before["bytes_out"]
    assert stages["clean"]["bytes_out"] < stages["clean"]["bytes_in"]


def test_shards_decode_to_the_kept_documents(prepared, corpus, tok):
    out, manifest = prepared
    train, val = (_documents(tok, _split_tokens(out, s)) for s in ("train", "val"))
    assert sorted(train + val) == sorted(corpus["kept"])
    assert train and val
    assert len(train) == manifest["splits"]["train"]["documents"]
    assert "Advertisement" not in "".join(train + val) and corpus["near"] not in train + val
    # train keeps input order (the document held back for val, if any, may come last)
    order = [corpus["kept"].index(d) for d in train]
    assert order[:-1] == sorted(order[:-1])
    # each split is <|endoftext|> + the documents joined by <|endoftext|>, token for token
    eot = tok.eot_token
    for split, docs in (("train", train), ("val", val)):
        expected = []
        for doc in docs:
            expected += [eot] + tok.encode_ordinary(doc)
        assert _split_tokens(out, split).tolist() == expected


def test_shard_files_have_the_header(prepared):
    out, manifest = prepared
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 2 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert [s["file"] for s in shards] == [f"train_{i:06d}.bin" for i in range(len(shards))]
    for s in shards + manifest["splits"]["val"]["shards"]:
        raw = (out / s["file"]).read_bytes()
        magic, version, count = struct.unpack_from("<iiq", raw)
        assert raw[:4] == b"G2FS" and magic == data.SHARD_MAGIC and version == 1 and count == s["tokens"]
        assert raw[16:256] == bytes(240)
        assert len(raw) == 256 + 2 * count == s["bytes"]
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        assert np.array_equal(read_shard(out / s["file"]), np.frombuffer(raw[256:], "<u2"))


def test_manifest_and_funnel_plot(prepared, corpus):
    out, manifest = prepared
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert manifest["dtype"] == "uint16" and manifest["shard_version"] == 1
    assert manifest["options"]["min_score"] == 3 and manifest["options"]["exclude_domains"] == ["wikipedia.org"]
    assert manifest["options"]["val_fraction"] == 0.3 and manifest["options"]["num_perm"] == 128
    assert [i["path"] for i in manifest["inputs"]] == [str(p.resolve()) for p in corpus["inputs"]]
    assert "created" in manifest and manifest["funnel_plot"] == "funnel.png"
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    assert manifest["stages"][-1]["tokens"] == tokens
    assert 0 < manifest["splits"]["train"]["max_token"] < 50257
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = data.funnel_table(manifest)
    assert "near-duplicates" in table and "near_duplicate 1" in table and "tokens" in table


def test_the_split_is_deterministic_and_val_is_never_empty(corpus, tmp_path, tok):
    opts = PrepareOptions(val_fraction=0.005, seed=3)
    m1 = prepare(corpus["inputs"], tmp_path / "a", opts, log=lambda s: None)
    m2 = prepare(list(reversed(corpus["inputs"])), tmp_path / "b", opts, log=lambda s: None)
    assert m1["splits"]["val"]["documents"] == 1
    val_a, val_b = (_documents(tok, _split_tokens(tmp_path / d, "val")) for d in "ab")
    assert val_a == val_b and m2["splits"]["val"]["documents"] == 1
    none = prepare(corpus["inputs"], tmp_path / "c", PrepareOptions(val_fraction=0), log=lambda s: None)
    assert none["splits"]["val"]["documents"] == 0 and none["splits"]["val"]["shards"] == []


def test_rerun_is_a_noop_and_other_options_need_force(corpus, tmp_path):
    out = tmp_path / "out"
    first = prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    again = prepare(corpus["inputs"], out, PrepareOptions(**SMALL, num_threads=1), log=said.append)
    assert again == first and "nothing to do" in said[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(DataError, match=r"options.min_chars: 200 -> 50.*--force"):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL, min_chars=50), log=lambda s: None)
    rebuilt = prepare(corpus["inputs"], out, PrepareOptions(**SMALL, min_chars=10), force=True, log=lambda s: None)
    assert rebuilt["stages"][4]["dropped_by"] == {}  # "Too short to keep." now passes
    (out / "val_000000.bin").write_bytes(b"junk")
    with pytest.raises(DataError, match="damaged.*val_000000.bin"):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL, min_chars=10), log=lambda s: None)


def _assert_unfinished(out):
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp"))
    for shard in out.glob("*.bin"):
        read_shard_header(shard)  # whatever shard is there is complete
    with pytest.raises(DataError, match="no manifest.json"):
        TokenLoader(out, "train", 2, 8)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_crash_leaves_nothing_that_looks_finished(corpus, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    finish = data._ShardWriter._finish
    calls = []

    def crash_on_second_shard(self):
        calls.append(self.split)
        if len(calls) == 2:
            raise error("simulated crash")
        finish(self)

    monkeypatch.setattr(data._ShardWriter, "_finish", crash_on_second_shard)
    with pytest.raises(error):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    _assert_unfinished(out)
    assert list(out.glob("train_000000.bin"))
    monkeypatch.undo()
    (out / ".train_000003.bin.tmp").write_bytes(bytes(300))  # what a kill -9 would leave
    said = []
    manifest = prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=said.append)
    assert "unfinished run" in said[0]
    assert not list(out.glob(".*.tmp"))
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        s["file"] for sp in manifest["splits"].values() for s in sp["shards"])


def test_a_crash_while_tokenizing_leaves_no_manifest(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(data, "_as_uint16", lambda ids, tokenizer: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    _assert_unfinished(out)


class _BigTokenizer:
    name, eot_token = "big", 3

    def __init__(self, n_vocab, ids):
        self.n_vocab, self._ids = n_vocab, ids

    def encode_ordinary_batch(self, texts, num_threads=None):
        return [list(self._ids) for _ in texts]


def test_ids_that_do_not_fit_uint16_are_refused(corpus, tmp_path):
    with pytest.raises(DataError, match="100000 tokens.*uint16"):
        prepare(corpus["inputs"], tmp_path / "a", tokenizer=_BigTokenizer(100_000, [1]), log=lambda s: None)
    with pytest.raises(DataError, match="token id 70000 .* does not fit in a uint16"):
        prepare(corpus["inputs"], tmp_path / "b", tokenizer=_BigTokenizer(50_000, [1, 70000]), log=lambda s: None)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_bad_inputs_and_options(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "score": "lots"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: \"score\" must be a number"):
        prepare([bad], tmp_path / "out", log=lambda s: None)
    with pytest.raises(DataError, match="inside the input folder"):
        prepare([tmp_path], tmp_path / "out", log=lambda s: None)
    with pytest.raises(DataError, match="val_fraction"):
        PrepareOptions(val_fraction=1.5)


# ------------------------------------------------------------------------------------------ the shipped corpus
def test_the_shipped_corpus(tmp_path, tok, small_documents, capsys):
    manifest = prepare([], tmp_path / "out")
    printed = capsys.readouterr().out
    assert "tokenized (GPT-2 BPE)" in printed and "near-duplicates" in printed
    assert manifest["stages"][-1]["docs_out"] == len(small_documents) == 135  # clean prose: nothing dropped
    assert manifest["splits"]["val"]["documents"] >= 1
    expected = sum(len(tok.encode_ordinary(clean_text(d)[0])) + 1 for d in small_documents)
    assert sum(s["tokens"] for s in manifest["splits"].values()) == expected
    h = unigram_entropy(tmp_path / "out", "val")
    assert 4 < h < math.log(50257)


# ------------------------------------------------------------------------------------------ loader
def test_loader_is_deterministic_and_shifts_by_one(prepared):
    out, _ = prepared
    a, b = (TokenLoader(out, "train", batch_size=4, block_size=16, seed=1) for _ in range(2))
    other = TokenLoader(out, "train", batch_size=4, block_size=16, seed=2)
    ds = a.dataset
    differs = False
    for _ in range(10):
        starts = a.window_starts()
        (xa, ya), (xb, yb), (xo, _) = next(a), next(b), next(other)
        assert xa.dtype == ya.dtype == torch.int64 and xa.shape == ya.shape == (4, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        for row, s in zip(xa, starts):
            assert row.tolist() == ds.read(int(s), 16).tolist()
        differs |= not torch.equal(xa, xo)
    assert differs


def test_an_epoch_sees_every_window_once(prepared):
    out, _ = prepared
    loader = TokenLoader(out, "train", batch_size=3, block_size=16, seed=4)
    n = loader.windows_per_epoch
    starts = []
    while loader.position < n:
        starts += loader.window_starts().tolist()
        next(loader)
    first_epoch = starts[:n]
    assert len(set(first_epoch)) == n
    offsets = {s % 17 for s in first_epoch}
    assert len(offsets) == 1  # one random cut per epoch, windows do not overlap
    assert max(first_epoch) + 17 <= loader.dataset.num_tokens


def test_ranks_get_disjoint_parts_of_the_same_global_batch(prepared):
    out, _ = prepared
    ranks = [TokenLoader(out, "train", batch_size=2, block_size=16, seed=9, rank=r, world_size=3) for r in range(3)]
    single = TokenLoader(out, "train", batch_size=6, block_size=16, seed=9)
    for _ in range(5):
        starts = [r.window_starts() for r in ranks]
        assert len(set(np.concatenate(starts).tolist())) == 6
        xs = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(xs), next(single)[0])


def test_resume_gives_the_next_batch_exactly(prepared):
    out, _ = prepared
    for rank in (0, 1):
        make = lambda rank=rank: TokenLoader(out, "train", batch_size=4, block_size=16, seed=5, rank=rank,
                                         world_size=2)
        straight = make()
        for _ in range(30):  # past an epoch boundary
            next(straight)
        state = straight.state_dict()
        expected = [next(straight) for _ in range(5)]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        for x, y in expected:
            rx, ry = next(resumed)
            assert torch.equal(x, rx) and torch.equal(y, ry)
    wrong_seed = TokenLoader(out, "train", batch_size=4, block_size=16, seed=6)
    with pytest.raises(ValueError, match="seed 5"):
        wrong_seed.load_state_dict(state)


def test_loader_errors(prepared, tmp_path):
    out, manifest = prepared
    n = manifest["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=rf"{n:,} tokens, fewer than block_size \+ 1"):
        TokenLoader(out, "val", batch_size=1, block_size=n)
    TokenLoader(out, "val", batch_size=1, block_size=n - 1)  # exactly enough
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(out, "test", 1, 8)
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        TokenLoader(out, "train", 1, 8, rank=2, world_size=2)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"XXXX" + raw[4:], "not a gpt2fast token shard: magic"),
    (lambda raw: raw[:-10], "truncated: its header says 1000 tokens"),
    (lambda raw: raw[:100], "truncated: 100 bytes, shorter than the 256-byte header"),
    (lambda raw: raw[:4] + struct.pack("<i", 9) + raw[8:], "format version 9"),
    (lambda raw: raw + b"\0\0", "corrupt: its header says 1000 tokens"),
])
def test_corrupt_shards_are_named(prepared, tmp_path, damage, message):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shard = out / "train_000001.bin"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ShardError, match=message) as e:
        TokenLoader(out, "train", 2, 8)
    assert "train_000001.bin" in str(e.value)
    shard.unlink()
    with pytest.raises(ShardError, match="train_000001.bin is missing"):
        ShardDataset(out, "train")


def test_verify_checks_the_sha256(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    shard = out / "val_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    ShardDataset(out, "val")  # sizes still agree
    with pytest.raises(ShardError, match="val_000000.bin has sha256"):
        ShardDataset(out, "val", verify=True)


def test_unigram_entropy(prepared):
    out, _ = prepared
    tokens = _split_tokens(out, "train")
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    assert unigram_entropy(out, "train") == pytest.approx(-(p * np.log(p)).sum())
    assert unigram_entropy(out, "train", "bits") == pytest.approx(-(p * np.log2(p)).sum())
    with pytest.raises(ValueError, match="unit"):
        unigram_entropy(out, "train", "bans")


# ------------------------------------------------------------------------------------------ command line
def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", *map(str, corpus["inputs"]), "--out", str(out), "--val-fraction", "0.3",
            "--shard-tokens", "1000", "--exclude-domains", "", "--no-score-filter", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "quality score (off)" in printed and "domain (off)" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][1]["docs_out"] == 12 and manifest["stages"][2]["docs_out"] == 12
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "train_000000.bin" in info and "unigram entropy" in info
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


_MEMORY_PROBE = r"""
import gzip, json, random, resource, sys
from pathlib import Path
from gpt2fast import data

words_per_doc, out = int(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(1)
vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
text_bytes = 0
with gzip.open(out / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
    for _ in range(60):
        text = "\n".join(" ".join(rng.choice(vocab) for _ in range(12)).capitalize() + "."
                         for _ in range(words_per_doc // 12))
        text_bytes += len(text)
        f.write(json.dumps({"text": text}) + "\n")
del text
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
manifest = data.prepare([out / "corpus.jsonl.gz"], out / "shards", data.PrepareOptions(batch_chars=200_000),
                        log=lambda s: None)
print(json.dumps({"text_bytes": text_bytes, "before_kib": before,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "tokens": sum(s["tokens"] for s in manifest["splits"].values())}))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or __import__("sys").platform != "linux",
                    reason="peak resident memory is read with getrusage (ru_maxrss in KiB on Linux)")
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    """prepare streams: forty times the text (60 documents of ~13 KB, then of ~520 KB: 0.8 MB, then 31 MB) raises
    the peak resident memory by far less than the extra text itself, let alone its tokens (measured: no growth
    beyond the few MB of noise; holding the input in one tokenizer batch instead grows it by ~100 MB)."""
    import subprocess
    import sys

    from conftest import REPO

    runs = []
    for words in (2_000, 80_000):
        folder = tmp_path / str(words)
        folder.mkdir()
        done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(words), str(folder)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = runs
    extra_text = large["text_bytes"] - small["text_bytes"]
    assert extra_text > 28e6 and large["tokens"] > 30 * small["tokens"]
    growth = (large["peak_kib"] - small["peak_kib"]) * 1024
    assert growth < 0.25 * extra_text, (f"peak memory grew by {growth / 1e6:.1f} MB for {extra_text / 1e6:.1f} MB "
                                       f"more text: the pipeline holds its input")
