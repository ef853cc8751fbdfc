"""Tokenizer benchmarks: gpt2fast beside its peers, on the same text, in the same run.

    pytest benchmarks/ --benchmark-only
    GPT2FAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable -q   # smoke run (see conftest.py)

Each comparison is one pytest-benchmark group (ours and the peer side by side); the figures (MB/s of UTF-8
input, or MiB) land in ``extra_info`` and in the table printed at the end of the session.

Goals: encode_ordinary on one thread >= 3x tiktoken; the batch on all cores >= tiktoken; training no slower
than Hugging Face ``tokenizers``; a loaded GPT-2 tokenizer takes no more memory than tiktoken's; and time
linear in the input on long runs of one character (reported, not asserted: no wall-clock thresholds).
"""
import os
import time

import pytest

# Tests list ``measure`` (the benchmark fixture) last: a peer that is not installed skips the test while
# its fixture is set up, before the benchmark fixture exists.
ENCODE_PEER = "tiktoken"
TRAIN_PEER = "hf-tokenizers"
GOAL_SINGLE_THREAD = 3.0
GOAL_BATCH = 1.0
GOAL_TRAIN = 1.0
GOAL_MEMORY = 1.0
# Each is one pre-token piece (letters, digits, punctuation) or one whitespace run when repeated.
PATHOLOGICAL_CHARS = {"a": "letter", " ": "space", "7": "digit", "!": "punct"}


def _exp10(n: int) -> str:
    return f"1e{len(str(n)) - 1}"


def test_encode_single_thread(gpt2_encoder, corpus, measure):
    measure.throughput(lambda: gpt2_encoder.encode_ordinary(corpus.text), gpt2_encoder,
                       group="encode_ordinary, 1 thread", peer=ENCODE_PEER, nbytes=corpus.nbytes,
                       goal=GOAL_SINGLE_THREAD, rounds=5, warmup_rounds=1, tokens=len)


def test_encode_batch_all_cores(gpt2_encoder, corpus, measure):
    _, batches = measure.throughput(
        lambda: gpt2_encoder.encode_ordinary_batch(corpus.texts), gpt2_encoder,
        group=f"encode_ordinary_batch, {os.cpu_count()} threads", peer=ENCODE_PEER, nbytes=corpus.nbytes,
        goal=GOAL_BATCH, rounds=5, warmup_rounds=1, tokens=lambda out: sum(map(len, out)))
    assert len(batches) == len(corpus.texts)
    measure.note(threads=os.cpu_count(), documents=len(corpus.texts))


def test_train(bpe_trainer, corpus, train_merges, measure):
    vocab_size = 256 + train_merges + 1  # byte tokens, merges, <|endoftext|>
    _, trained_size = measure.throughput(lambda: bpe_trainer.train(corpus.texts, vocab_size), bpe_trainer,
                                         group=f"train {train_merges} merges", peer=TRAIN_PEER,
                                         nbytes=corpus.nbytes, goal=GOAL_TRAIN, rounds=3,
                                         show_seconds=True)
    measure.note(vocab_size_requested=vocab_size, vocab_size_trained=trained_size)
    if bpe_trainer.role == "ours":
        assert trained_size == vocab_size


def test_resident_memory(gpt2_encoder, measure):
    measure.resident_memory(gpt2_encoder, group="RSS of loaded GPT-2 tokenizer", peer=ENCODE_PEER,
                            goal=GOAL_MEMORY)


@pytest.mark.parametrize("char", PATHOLOGICAL_CHARS, ids=PATHOLOGICAL_CHARS.get)
def test_pathological(gpt2_encoder, repeat, char, measure):
    """One long piece: a quadratic BPE shows here. ``repeat`` goes to 10^6 for ours, to 10^5 for the peer
    (pairs generated in conftest.py)."""
    text = char * repeat
    seconds, ids = measure.throughput(lambda: gpt2_encoder.encode_ordinary(text), gpt2_encoder,
                                      group=f"pathological {char!r} x {_exp10(repeat)}", peer=ENCODE_PEER,
                                      nbytes=len(text.encode("utf-8")), tokens=len)
    measure.note(**{"ns/char": round(seconds / repeat * 1e9, 2)})
    assert ids


def _best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("char", PATHOLOGICAL_CHARS, ids=PATHOLOGICAL_CHARS.get)
def test_linear_time(ours, pathological_sizes, char, measure):
    """Per-character time on the longest run over that on the shortest: about 1 when encoding is linear.
    Reported in extra_info and the summary; nothing is asserted on time."""
    texts = {n: char * n for n in pathological_sizes}

    def ns_per_char():
        return {n: _best_seconds(lambda n=n: ours.encode_ordinary(texts[n])) / n * 1e9 for n in pathological_sizes}

    _, per_char = measure.run(ns_per_char, group="linear time (ours)", rounds=1)
    shortest, longest = min(pathological_sizes), max(pathological_sizes)
    ratio = per_char[longest] / per_char[shortest]
    label = f"ns/char {_exp10(longest)} / {_exp10(shortest)}"
    measure.note(impl="gpt2fast", char=char, **{"ns/char": {_exp10(n): round(v, 2) for n, v in per_char.items()}},
                 **{label: round(ratio, 3)})
    measure.summary_note(f"linear time {char!r}: " + ", ".join(f"{v:.1f} ns/char at {_exp10(n)}"
                                                       for n, v in per_char.items())
                 + f"; {label} = {ratio:.2f}")
