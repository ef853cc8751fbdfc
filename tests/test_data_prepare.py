"""gpt2fast.data.pipeline (``prepare``): each stage's counts, the shards' contents, the manifest and funnel, the
split, re-runs and crashes; the options and the command line built from them; memory that stays flat."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import pytest
from data_testing import SMALL, documents, split_tokens

from gpt2fast import data
from gpt2fast.data import (
    ConfigError,
    DataError,
    PrepareOptions,
    TokenLoader,
    clean_text,
    main,
    prepare,
    read_shard_header,
    shards,
    unigram_entropy,
    work,
)
from gpt2fast.data import options as options_module

pytest_plugins = ["data_testing"]


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
    train, val = (documents(tok, split_tokens(out, s)) for s in ("train", "val"))
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
        assert split_tokens(out, split).tolist() == expected


def test_manifest_and_funnel_plot(prepared, corpus):
    out, manifest = prepared
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert manifest["dtype"] == "uint16" and manifest["shard_version"] == 1
    assert manifest["options"]["min_score"] == 3 and manifest["options"]["exclude_domains"] == ["wikipedia.org"]
    assert manifest["options"]["val_fraction"] == 0.3 and manifest["options"]["shingle_normalize"] is True
    assert [i["path"] for i in manifest["inputs"]] == [str(p.resolve()) for p in corpus["inputs"]]
    assert manifest["funnel_plot"] == "funnel.png"
    assert "created" not in manifest and "seconds" not in manifest  # the same data makes the same manifest
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
    val_a, val_b = (documents(tok, split_tokens(tmp_path / d, "val")) for d in "ab")
    assert val_a == val_b and m2["splits"]["val"]["documents"] == 1
    none = prepare(corpus["inputs"], tmp_path / "c", PrepareOptions(val_fraction=0), log=lambda s: None)
    assert none["splits"]["val"]["documents"] == 0 and none["splits"]["val"]["shards"] == []


def test_rerun_is_a_noop_and_other_options_need_force(corpus, tmp_path):
    out = tmp_path / "out"
    first = prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    again = prepare(corpus["inputs"], out, PrepareOptions(**SMALL, workers=1), log=said.append)
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
    finish = shards.ShardWriter._finish
    calls = []

    def crash_on_second_shard(self):
        calls.append(self.split)
        if len(calls) == 2:
            raise error("simulated crash")
        finish(self)

    monkeypatch.setattr(shards.ShardWriter, "_finish", crash_on_second_shard)
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
    monkeypatch.setattr(work, "as_uint16", lambda ids, tokenizer: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        prepare(corpus["inputs"], out, PrepareOptions(**SMALL), log=lambda s: None)
    _assert_unfinished(out)


def test_bad_inputs_and_options(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "score": "lots"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: \"score\" must be a number.*--strict"):
        prepare([bad], tmp_path / "out", PrepareOptions(strict=True), log=lambda s: None)
    with pytest.raises(DataError, match="inside the input folder"):
        prepare([tmp_path], tmp_path / "out", log=lambda s: None)
    with pytest.raises(ConfigError, match=r"val_fraction=1.5 \(--val-fraction\) is out of range: it must be in "
                                          r"\[0, 1\)"):
        PrepareOptions(val_fraction=1.5)
    assert issubclass(ConfigError, ValueError)  # code that caught ValueError still does


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


# ------------------------------------------------------------------------------------------ options, command line
def _parse(*argv) -> PrepareOptions:
    parser = argparse.ArgumentParser()
    options_module.add_arguments(parser)
    return options_module.from_arguments(parser.parse_args(list(argv)))


def test_the_command_line_is_built_from_the_options():
    assert _parse() == PrepareOptions()  # the flags' defaults are the fields' defaults
    spelled = _parse("--min-score", "5", "--exclude-domains", "a.org,.B.com", "--min-chars", "10",
                     "--max-chars", "99", "--min-letter-share", "0.5", "--max-dup-line-share", "0.4",
                     "--max-top-ngram-share", "0.3", "--repetition-ngram", "2", "--near-dup-threshold", "0.7",
                     "--no-shingle-normalize", "--shingle-words", "3", "--val-fraction", "0.1", "--seed", "1",
                     "--shard-tokens", "500", "--workers", "2", "--engine", "ray", "--batch-docs", "8",
                     "--batch-chars", "1000", "--strict")
    assert spelled == PrepareOptions(
        min_score=5, exclude_domains=("a.org", "b.com"), min_chars=10, max_chars=99, min_letter_share=0.5,
        max_dup_line_share=0.4, max_top_ngram_share=0.3, repetition_ngram=2, near_dup_threshold=0.7,
        shingle_normalize=False, shingle_words=3, val_fraction=0.1, seed=1, shard_tokens=500, workers=2, engine="ray",
        batch_docs=8, batch_chars=1000, strict=True)
    assert _parse("--no-score-filter", "--min-score", "9").min_score is None  # in either order
    assert _parse("--no-near-dedup").near_dedup is False
    assert _parse("--exclude-domains", "").exclude_domains == ()
    for f in dataclasses.fields(PrepareOptions):  # every field has its help
        assert f.metadata["help"], f.name
    assert set(PrepareOptions().output_options()) == {
        f.name for f in dataclasses.fields(PrepareOptions)} - {"workers", "engine", "batch_docs", "batch_chars",
                                                         "strict"}


def test_every_flag_is_in_the_user_guide():
    from conftest import REPO

    guide = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    parser = argparse.ArgumentParser(add_help=False)
    options_module.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags and not [f for f in sorted(flags) if not re.search(rf"`{f}\b", guide)]


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
    assert main(["prepare", "--out", str(out), "--val-fraction", "1.5"]) == 2
    assert "val_fraction=1.5 (--val-fraction) is out of range" in capsys.readouterr().err


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
