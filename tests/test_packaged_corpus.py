"""The default run's data: the packaged corpus with a vocabulary learned from its training split."""
from __future__ import annotations

import math

import pytest

from gpt2fast import packaged_corpus as pc
from gpt2fast.errors import ConfigError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "data"
    return folder, pc.prepare(folder, "corpus:300", log=lambda s: None)


def test_the_corpus_vocabulary_splits_the_corpus_like_gpt2s_and_spells_the_same_text(prepared):
    gpt2_dir, corpus_dir = prepared
    assert corpus_dir.name == "data-corpus300" and (corpus_dir / "vocab" / "vocab.bpe").is_file()
    ours, gpt2 = pc.tokenizer_for(corpus_dir), pc.tokenizer_for(gpt2_dir)
    assert ours.n_vocab == 300 and gpt2.n_vocab == 50257
    for split in ("train", "val"):
        (n_ours, bytes_ours), (n_gpt2, bytes_gpt2) = (pc.split_bytes(corpus_dir, split, ours),
                                                      pc.split_bytes(gpt2_dir, split, gpt2))
        assert bytes_ours == bytes_gpt2 > 0, "the same documents in the same split"
        assert n_ours > n_gpt2, "a 300-token vocabulary needs more tokens for the same text"
    assert pc._split_texts(corpus_dir.with_name("data"), "val")[0] in \
        [ours.decode(d) for d in [ours.encode_ordinary(pc._split_texts(gpt2_dir, "val")[0])]]


def test_the_vocabulary_is_learned_from_the_training_split_only(prepared):
    from gpt2fast.tokenizer import Tokenizer

    gpt2_dir, corpus_dir = prepared
    expected = Tokenizer.train(pc._split_texts(gpt2_dir, "train"), 300)
    assert pc.tokenizer_for(corpus_dir)._core.ordinary_tokens() == expected._core.ordinary_tokens()


def test_prepared_once(prepared, tmp_path):
    gpt2_dir, corpus_dir = prepared
    before = (corpus_dir / "manifest.json").stat().st_mtime_ns
    assert pc.prepare(gpt2_dir, "corpus:300", log=lambda s: None) == corpus_dir
    assert (corpus_dir / "manifest.json").stat().st_mtime_ns == before
    assert pc.prepare(gpt2_dir, "gpt2", log=lambda s: None) == gpt2_dir


@pytest.mark.parametrize("spec", ["corpus", "corpus:100", "corpus:x", "bpe:2048", ""])
def test_bad_vocab_settings_name_the_setting_and_the_fix(spec):
    with pytest.raises(ConfigError, match=r"--vocab .*give gpt2 .* or corpus:N with N >= 257"):
        pc.parse_vocab(spec)


def test_bits_per_byte():
    assert pc.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert pc.bits_per_byte(2 * math.log(2), 100, 400) == pytest.approx(0.5)
