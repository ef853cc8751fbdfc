"""gpt2fast.tokenizer: parity with GPT-2's encoding (tiktoken), special tokens, decoding, training, errors."""
from __future__ import annotations

import base64
import random
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import reference_bpe
import regex
from conftest import ASSETS, GPT2_PATTERN, SHARED_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2fast import Tokenizer
from gpt2fast.tokenizer import VocabularyError

EOT = "<|endoftext|>"

# Any valid Unicode string: every category but lone surrogates, which a valid str cannot hold.
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
# Strings built from the pieces the pre-tokenizer's rules hinge on, so that the rare paths get hit often.
tricky_alphabet = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "'S", "'x", " ", "  ", "\n", "\t", "\r\n",
                   "\u00a0", "\u3000", "\u2028", "\x0b", "\x1c", "\x85", "a", "Zz", "é", "ß", "中文", "1", "٣", "²",
                   "Ⅻ",
                   "!", "?!", "...", "-", "😀", "👍🏽", "\u0301", "\u200b", "\ufeff", "$", "_", "<|", "|>"]
tricky_text = st.lists(st.sampled_from(tricky_alphabet), max_size=40).map("".join)


# ------------------------------------------------------------------------------------ GPT-2 parity
def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello  world!\n") == [18435, 220, 995, 0, 198]
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_same_ids_as_tiktoken_on_the_whole_corpus(tok, tiktoken_gpt2, corpus_documents):
    for name, docs in corpus_documents.items():
        ours = tok.encode_ordinary_batch(docs)
        for i, (doc, ids) in enumerate(zip(docs, ours)):
            assert ids == tiktoken_gpt2.encode_ordinary(doc), f"{name} document {i} differs"
        joined = "".join(docs)
        assert tok.encode_ordinary(joined) == tiktoken_gpt2.encode_ordinary(joined), name


def test_same_ids_as_tiktoken_on_python_sources(tok, tiktoken_gpt2):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:250] + sorted((stdlib / "json").glob("*.py"))
    assert len(files) > 50
    checked = 0
    for f in files:
        try:
            source = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        assert tok.encode_ordinary(source) == tiktoken_gpt2.encode_ordinary(source), str(f)
        assert tok.decode(tok.encode_ordinary(source)) == source
        checked += 1
    assert checked > 50


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unicode_text)
def test_same_ids_as_tiktoken_on_any_unicode(tok, tiktoken_gpt2, text):
    ids = tok.encode_ordinary(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(ids) == text


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tricky_text)
def test_same_ids_as_tiktoken_around_contractions_and_whitespace(tok, tiktoken_gpt2, text):
    assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_every_code_point_matches_tiktoken(tok, tiktoken_gpt2):
    # Each code point between letters, numbers and spaces, so that its class decides the piece boundaries.
    valid = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    for start in range(0, len(valid), 2048):
        chunk = valid[start:start + 2048]
        text = "".join(f"a{c}b {c}1 {c}{c}!\n{c}" for c in map(chr, chunk))
        assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), f"U+{chunk[0]:04X}..U+{chunk[-1]:04X}"


@settings(max_examples=500, deadline=None)
@given(st.one_of(unicode_text, tricky_text))
def test_pretokenize_matches_the_regex(tok, text):
    pieces = tok.pretokenize(text)
    assert "".join(pieces) == text
    # The third-party `regex` module may know a different Unicode version than tiktoken's engine; compare
    # where both classify every character the same way.
    assert pieces == regex.findall(GPT2_PATTERN, text) or _unicode_versions_disagree(text)


def _unicode_versions_disagree(text: str) -> bool:
    from gpt2fast import _bpe

    return any(_bpe.pretokenize("a" + c + "a") != regex.findall(GPT2_PATTERN, "a" + c + "a") for c in set(text))


@pytest.mark.parametrize("unit", ["a", " ", "7", "!", "\n", "é", "中", "ab", " a", "1 ", "\u3000"])
@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 1000, 10_000])
def test_long_runs_match_tiktoken(tok, tiktoken_gpt2, unit, n):
    text = unit * n
    assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


@pytest.mark.parametrize("unit", ["a", " ", "7", "!"])
def test_million_character_runs_round_trip(tok, unit):
    text = unit * 1_000_000
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    if unit != " ":  # GPT-2 has no token of several spaces
        assert len(ids) <= len(text) // 2


def test_heap_merge_equals_simple_merge(tok):
    # Pieces of up to 128 bytes take the simple path, longer ones a heap; both must give tiktoken's merges.
    rng = random.Random(1234)
    core = tok._core
    for _ in range(3000):
        alphabet = rng.choice([b"ab", b"abc ", b"the ", b"\xe4\xb8\xad", bytes(range(97, 123))])
        piece = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 200)))
        simple = reference_bpe.bpe_ranks_merge(piece, tok.token_id) if len(piece) <= 40 else None
        heap = core.merge_piece(piece, True)
        assert heap == core.merge_piece(piece, False)
        if simple is not None:
            assert heap == simple
        assert b"".join(tok.decode_single_token_bytes(i) for i in heap) == piece


def test_batch_equals_one_by_one_for_any_thread_count(tok, small_documents):
    docs = small_documents[:60] + ["", " ", "x"]
    expected = [tok.encode_ordinary(d) for d in docs]
    for threads in (1, 2, 3, 8, None):
        assert tok.encode_ordinary_batch(docs, num_threads=threads) == expected
        assert tok.encode_batch(docs, num_threads=threads) == expected
    assert tok.encode_ordinary_batch([]) == []


def test_concurrent_callers_get_their_own_results(tok, small_documents):
    docs = small_documents[:40]
    expected = [tok.encode_ordinary(d) for d in docs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(tok.encode_ordinary, docs * 3))
        batches = list(pool.map(lambda part: tok.encode_ordinary_batch(part, num_threads=2),
                                [docs[:20], docs[20:], docs]))
    assert results == expected * 3
    assert batches == [expected[:20], expected[20:], expected]


def test_concurrent_batches_never_see_each_others_buffers(tok, small_documents):
    # A batch reads its ids out of the pool's per-thread buffers after the workers finish; the next batch
    # must not start refilling those buffers before then.
    parts = [small_documents[i:i + 12] for i in range(0, 96, 12)]
    expected = [[tok.encode_ordinary(d) for d in part] for part in parts]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            got = list(pool.map(lambda part: tok.encode_ordinary_batch(part, num_threads=2), parts))
            assert got == expected


# ---------------------------------------------------------------------------------- special tokens
def test_special_token_text_is_an_error_by_default(tok):
    with pytest.raises(ValueError) as e:
        tok.encode("hello <|endoftext|> world")
    message = str(e.value)
    assert "'<|endoftext|>'" in message and "character 6" in message
    assert "allowed_special" in message and "disallowed_special=()" in message


def test_special_token_semantics_match_tiktoken(tok, tiktoken_gpt2):
    texts = ["a<|endoftext|>b", "<|endoftext|>", "x <|endoftext|><|endoftext|> y\n", "<|endoftext", "  <|endoftext|>  "]
    for text in texts:
        assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special={EOT}) == tiktoken_gpt2.encode(text, allowed_special={EOT})
        assert tok.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
        assert tok.encode(text, disallowed_special=()) == tok.encode_ordinary(text)
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert tok.encode_batch(texts, allowed_special="all") == [tok.encode(t, allowed_special="all") for t in texts]


def test_batch_names_the_text_with_a_disallowed_special(tok):
    with pytest.raises(ValueError, match=r"texts\[1\] contains the special token"):
        tok.encode_batch(["fine", "not <|endoftext|> fine"])


def test_unknown_special_names_are_an_error(tok):
    with pytest.raises(ValueError, match="<|startoftext|>"):
        tok.encode("x", allowed_special={"<|startoftext|>"})
    with pytest.raises(ValueError, match="<|nope|>"):
        tok.encode("x", disallowed_special={"<|nope|>"})


# ---------------------------------------------------------------------------------------- decoding
def test_decode_replaces_invalid_utf8_and_decode_bytes_keeps_it(tok):
    lone_byte = tok.token_id(b"\xff")
    assert tok.decode([lone_byte]) == "\ufffd"
    assert tok.decode_bytes([lone_byte]) == b"\xff"
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    assert tok.decode(emoji[:1]) == "\ufffd" or tok.decode(emoji[:1]).endswith("\ufffd")


def test_decode_accepts_any_sequence_of_ints(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("numpy arrays too")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "numpy arrays too"
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "numpy arrays too"


@pytest.mark.parametrize("bad", [50257, 10**9, -1, 2**70])
def test_ids_outside_the_vocabulary_are_an_error(tok, bad):
    with pytest.raises(ValueError, match=r"at position 2 is not in the vocabulary \(valid ids: 0\.\.50256\)"):
        tok.decode([1, 2, bad])


def test_non_integer_ids_are_an_error(tok):
    with pytest.raises(TypeError, match="position 1"):
        tok.decode([1, "2"])


@settings(max_examples=300, deadline=None)
@given(unicode_text, st.integers(1, 4))
def test_stream_decoder_never_splits_a_character(tok, text, step):
    ids = tok.encode_ordinary(text)
    stream = tok.stream_decoder()
    chunks = [stream.feed(ids[i:i + step]) for i in range(0, len(ids), step)]
    chunks.append(stream.flush())
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


def test_stream_decoder_flush_marks_an_unfinished_character(tok):
    ids = tok.encode("é😀")
    stream = tok.stream_decoder()
    out = stream.feed(ids[:-1])
    assert out.startswith("é") and "\ufffd" not in out
    assert stream.flush() == "\ufffd"


# ------------------------------------------------------------------------------------- bad input
def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match=r"texts\[2\] contains a lone surrogate U\+DFFF at index 0"):
        tok.encode_ordinary_batch(["ok", "fine", "\udfff"])


def test_wrong_argument_types_are_clear_errors(tok):
    with pytest.raises(TypeError, match="must be str"):
        tok.encode_ordinary(b"bytes")
    with pytest.raises(TypeError, match="single str"):
        tok.encode_ordinary_batch("not a list")
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        tok.encode_ordinary_batch(["x"], num_threads=0)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_from_files_reads_the_shipped_vocabulary(tok, tiktoken_gpt2, small_documents):
    other = Tokenizer.from_files(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    assert other.n_vocab == tok.n_vocab and other.eot_token == tok.eot_token
    assert other.encode_ordinary(small_documents[0]) == tok.encode_ordinary(small_documents[0])


def test_from_tiktoken_reads_the_ranks_file(tok, small_documents):
    path = SHARED_DATA / "gpt2" / "gpt2.tiktoken"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    other = Tokenizer.from_tiktoken(path)
    assert other.n_vocab == 50257 and other.eot_token == 50256
    assert other.encode_batch(small_documents[:20]) == tok.encode_batch(small_documents[:20])


@pytest.mark.parametrize("cut", [0, 1, 1000, 523_457, 1_042_300])
def test_truncated_encoder_json_is_a_clear_error(tmp_path, cut):
    enc = _write(tmp_path / "encoder.json", (ASSETS / "encoder.json").read_bytes()[:cut])
    with pytest.raises(VocabularyError, match="encoder.json is malformed at byte .*truncated"):
        Tokenizer.from_files(enc, ASSETS / "vocab.bpe")


def test_truncated_vocab_bpe_is_a_clear_error(tmp_path):
    data = (ASSETS / "vocab.bpe").read_bytes()
    mid_line = _write(tmp_path / "mid.bpe", data[: data.index(b"\n", 200_000) + 3])
    with pytest.raises(VocabularyError, match=r"vocab.bpe line \d+ .*expected two tokens"):
        Tokenizer.from_files(ASSETS / "encoder.json", mid_line)
    at_line_end = _write(tmp_path / "end.bpe", data[: data.index(b"\n", 200_000) + 1])
    with pytest.raises(VocabularyError, match="is vocab.bpe truncated"):
        Tokenizer.from_files(ASSETS / "encoder.json", at_line_end)


def test_mismatched_vocabulary_files_are_a_clear_error(tmp_path):
    lines = (ASSETS / "vocab.bpe").read_bytes().split(b"\n")
    lines[5], lines[6] = lines[6], lines[5]
    swapped = _write(tmp_path / "vocab.bpe", b"\n".join(lines))
    with pytest.raises(VocabularyError, match="not from the same vocabulary"):
        Tokenizer.from_files(ASSETS / "encoder.json", swapped)
    unknown = _write(tmp_path / "unknown.bpe", b"#version: 0.2\nxy z\n")
    with pytest.raises(VocabularyError, match="line 2 .*no earlier line made"):
        Tokenizer.from_files(ASSETS / "encoder.json", unknown)


def test_malformed_tiktoken_files_are_clear_errors(tmp_path):
    good = (SHARED_DATA / "gpt2" / "gpt2.tiktoken")
    if not good.exists():
        pytest.skip(f"{good} is not there")
    data = good.read_bytes()
    cases = {
        "cut.tiktoken": (data[: data.index(b"\n", 300_000) + 4], r"line \d+ .*(rank|base64|truncated)"),
        "gap.tiktoken": (b"QQ== 0\nQg== 2\n", "out of range"),
        "dup.tiktoken": (b"QQ== 0\nQg== 0\n", "appears twice"),
        "b64.tiktoken": (b"Q!== 0\n", "not valid base64"),
        "bytes.tiktoken": (b"QQ== 0\nQg== 1\n", "no token for the single byte"),
    }
    for name, (content, pattern) in cases.items():
        with pytest.raises(VocabularyError, match=pattern):
            Tokenizer.from_tiktoken(_write(tmp_path / name, content))


@pytest.mark.parametrize("where,damage", [("encoder.json", b"\xff\xfe"), ("vocab.bpe", b"\xff"),
                                          ("vocab.bpe", b"\x00"), ("encoder.json", b"\\\xff")],
                         ids=["json-invalid-utf8", "bpe-invalid-utf8", "bpe-nul", "json-escaped-byte"])
def test_damaged_bytes_in_a_vocabulary_are_a_vocabulary_error(tmp_path, where, damage):
    """Invalid UTF-8 or a NUL byte in a vocabulary file: a VocabularyError that names both files and shows
    the damaged bytes escaped (not a bare UnicodeDecodeError, not a message cut short at the NUL)."""
    files = {name: (ASSETS / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    key = b'"\\u00ac": 10' if where == "encoder.json" else b"al ly"
    at = files[where].index(key) + 3
    files[where] = files[where][:at] + damage + files[where][at:]
    enc = _write(tmp_path / "encoder.json", files["encoder.json"])
    bpe = _write(tmp_path / "vocab.bpe", files["vocab.bpe"])
    with pytest.raises(VocabularyError) as err:
        Tokenizer.from_files(enc, bpe)
    message = str(err.value)
    assert str(enc) in message and str(bpe) in message
    if where == "vocab.bpe":
        assert f"\\x{damage[0]:02x}" in message and "line 199" in message, message
    else:
        assert "malformed at byte" in message or "gives id" in message, message


def test_ids_too_large_for_any_integer_are_reported_as_written(tok):
    with pytest.raises(VocabularyError, match=r"token id 18446744073709551616 at position 1 is not in the vocabulary"):
        tok.decode([1, 2**64])
    with pytest.raises(VocabularyError, match=r"token id -9223372036854775809 at position 0"):
        tok.decode([-(2**63) - 1])


@pytest.mark.parametrize("bad", [1.5, "2", True])
def test_num_threads_of_the_wrong_type_is_a_type_error(tok, bad):
    with pytest.raises(TypeError, match=r"num_threads must be an int of at least 1 \(or None for all cores\), got"):
        tok.encode_ordinary_batch(["hi"], num_threads=bad)
    with pytest.raises(TypeError, match=r"num_threads must be an int"):
        Tokenizer.train(["hi there"], 260, num_threads=bad)


def test_huge_num_threads_means_as_many_as_useful(tok):
    assert tok.encode_ordinary_batch(["hi", "there"], num_threads=2**70) == [[5303], [8117]]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_files(tmp_path / "nope.json", ASSETS / "vocab.bpe")


# ---------------------------------------------------------------------------------------- training
TRAIN_TEXTS = [
    "the cat sat on the mat. the cat ate the rat!<|endoftext|>it's the cat's hat, isn't it?",
    "aaaaaaaaaaaaaaa bbbb aaaa abab abab ababab 12345 123 12 ... !!! ??",
    "Ünïcödé wörds: naïve café, 中文字符 中文, emoji 😀😀😀 and tabs\t\tand\n\nnewlines  ",
]


@pytest.mark.parametrize("vocab_size", [257, 260, 300, 400])
def test_training_matches_the_reference_trainer(vocab_size):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small texts may run out of pairs before 400
        tok = Tokenizer.train(TRAIN_TEXTS, vocab_size, special_tokens=[EOT])
    ref_tokens, ref_merges = reference_bpe.train(TRAIN_TEXTS, vocab_size - 1, [EOT])
    assert tok._core.merges() == [tuple(m) for m in ref_merges]
    assert tok._core.ordinary_tokens() == ref_tokens
    assert tok.n_vocab == len(ref_tokens) + 1
    assert tok.eot_token == len(ref_tokens)


@settings(max_examples=40, deadline=None)
@given(st.lists(tricky_text, min_size=1, max_size=5), st.integers(257, 330))
def test_training_matches_the_reference_on_random_texts(texts, vocab_size):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train(texts, vocab_size, special_tokens=[EOT])
    ref_tokens, ref_merges = reference_bpe.train(texts, vocab_size - 1, [EOT])
    assert tok._core.merges() == [tuple(m) for m in ref_merges]
    assert tok._core.ordinary_tokens() == ref_tokens


def test_training_is_deterministic_across_thread_counts(small_documents):
    runs = [Tokenizer.train(small_documents, 600, num_threads=n) for n in (1, 2, 4)]
    merges = [r._core.merges() for r in runs]
    assert merges[0] == merges[1] == merges[2]
    assert runs[0].n_vocab == 600


def test_trained_vocabulary_encodes_saves_and_loads(tmp_path, small_documents):
    tok = Tokenizer.train(small_documents, 1000)
    assert tok.n_vocab == 1000 and tok.eot_token == 999
    text = small_documents[3]
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # it learned something
    enc_path, bpe_path = tok.save(tmp_path / "vocab")
    again = Tokenizer.from_files(enc_path, bpe_path)
    assert again.encode_ordinary(text) == ids
    assert again.encode(f"a{EOT}b", allowed_special="all") == tok.encode(f"a{EOT}b", allowed_special="all")
    assert not list(tmp_path.joinpath("vocab").glob(".*tmp"))  # no temporary files left behind


def test_vocabulary_with_very_long_tokens_encodes_like_tiktoken(tmp_path, tiktoken_gpt2):
    """The pair table of a vocabulary whose tokens are thousands of bytes long (trained on one long run of a
    letter) is built in linear time (a trie walk, not a hash of both sides of every split): the same tokens
    as tiktoken's own merge rule over the same ranks, straight after training and after save + from_files."""
    tiktoken = pytest.importorskip("tiktoken")
    tok = Tokenizer.train(["a" * 6000 + " " + "ab" * 3000], 290)
    ordinary = tok._core.ordinary_tokens()
    assert max(len(t) for t in ordinary) >= 2048
    ranks = {t: r for r, t in enumerate(ordinary)}
    peer = tiktoken.Encoding("long-tokens", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})
    enc_path, bpe_path = tok.save(tmp_path / "vocab")
    again = Tokenizer.from_files(enc_path, bpe_path)
    rng = random.Random(7)
    texts = ["a" * n for n in (1, 2, 3, 1000, 2047, 2048, 2049, 6000)]
    texts += ["".join(rng.choice("ab") for _ in range(rng.randint(1, 3000))) for _ in range(5)]
    texts += ["ab" * rng.randint(1, 3000) + " " + "a" * rng.randint(1, 6000) for _ in range(5)]
    for text in texts:
        expected = peer.encode_ordinary(text)
        assert tok.encode_ordinary(text) == expected
        assert again.encode_ordinary(text) == expected


def test_special_tokens_are_never_learned():
    texts = [f"the cat{EOT}sat on the mat{EOT}" * 200, "<|other|>the <|other|>mat" * 100]
    tok = Tokenizer.train(texts, 265, special_tokens=[EOT, "<|other|>"])
    assert tok.n_vocab == 265
    assert not any(b"|>" in t or b"<|" in t for t in tok._core.ordinary_tokens())
    assert tok.special_tokens == {EOT: 263, "<|other|>": 264}


def test_saving_gpt2_reproduces_its_files(tok, tmp_path):
    enc_path, bpe_path = tok.save(tmp_path)
    import json

    expected = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    assert json.loads(enc_path.read_text(encoding="utf-8")) == expected
    ours = bpe_path.read_text(encoding="utf-8").splitlines()
    original = (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert ours[1:] == [line for line in original[1:] if line]


def test_too_small_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vocab_size=257 is too small.*at least 258"):
        Tokenizer.train(["some text"], 257, special_tokens=[EOT, "<|pad|>"])
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["some text"], 100)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        Tokenizer.train(["some text"], 300.0)
    with pytest.raises(ValueError, match="twice"):
        Tokenizer.train(["some text"], 300, special_tokens=[EOT, EOT])


def test_running_out_of_pairs_warns():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = Tokenizer.train(["abab"], 1000)
    assert tok.n_vocab < 1000


def test_absurd_special_ids_are_a_clear_error(tmp_path):
    ranks = _write(tmp_path / "bytes.tiktoken",
                   b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    assert Tokenizer.from_tiktoken(ranks).eot_token == 256
    with pytest.raises(VocabularyError, match="far beyond the 256 ordinary tokens"):
        Tokenizer.from_tiktoken(ranks, special_tokens={EOT: 2_000_000_000})
    with pytest.raises(VocabularyError, match="which an ordinary token already uses"):
        Tokenizer.from_tiktoken(ranks, special_tokens={EOT: 5})


def test_batches_work_in_a_forked_child(tok, small_documents):
    # Data loaders fork after the parent has encoded; the child must not wait on the parent's threads.
    import multiprocessing

    docs = small_documents[:8]
    expected = tok.encode_ordinary_batch(docs, num_threads=2)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(tok.encode_ordinary_batch, (docs,), {"num_threads": 2})
        assert result.get(timeout=60) == expected


def test_tokenizers_pickle(tok, small_documents):
    import pickle

    assert pickle.loads(pickle.dumps(tok)) is tok  # the shipped vocabulary travels by reference
    trained = Tokenizer.train(small_documents[:10], 400)
    copy = pickle.loads(pickle.dumps(trained))
    assert copy.n_vocab == 400 and copy.special_tokens == trained.special_tokens
    assert copy.encode_ordinary(small_documents[11]) == trained.encode_ordinary(small_documents[11])
