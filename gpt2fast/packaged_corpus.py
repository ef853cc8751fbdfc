"""The data of the default run: the corpus shipped in the package, prepared once under the run's folder.

With GPT-2's 50,257-token vocabulary a CPU-sized model spends most of each step on the embedding and the output
head (6.4M of the default model's 7.2M parameters), not on learning. So the default run (``--vocab=corpus:2048``)
learns a small byte-level BPE vocabulary from the corpus's training split with our own trainer (well under a
second), tokenizes the corpus with it, and the model predicts 2,048 tokens instead. ``--vocab=gpt2`` keeps
GPT-2's vocabulary; a run given ``--data`` always uses the tokenizer its data was prepared with.

Losses are compared in bits per byte of validation text, which does not depend on the tokenization.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from gpt2fast.errors import ConfigError

VOCAB_FOLDER = "vocab"  # encoder.json + vocab.bpe beside the shards, when the data has its own vocabulary
VOCAB_FILES = ("encoder.json", "vocab.bpe")


def parse_vocab(spec: str) -> int:
    """0 for "gpt2", N for "corpus:N"."""
    if spec == "gpt2":
        return 0
    m = re.fullmatch(r"corpus:(\d+)", spec)
    if not m or int(m.group(1)) < 257:
        raise ConfigError(f"--vocab {spec!r}: give gpt2 (GPT-2's vocabulary) or corpus:N with N >= 257 (a BPE "
                          f"vocabulary of N tokens learned from the packaged corpus), e.g. corpus:2048")
    return int(m.group(1))


def prepare(folder: Path, vocab: str, log: Callable[[str], None] = print) -> Path:
    """The packaged corpus as shards: in ``folder`` with GPT-2's tokens, and for ``corpus:N`` in
    ``folder``-corpusN with a vocabulary of N tokens learned from the training split only (the GPT-2 shards'
    training documents, decoded back to text: GPT-2's byte-level BPE is lossless). A document's split depends
    on its text alone, so both folders split the corpus the same way. Prepared once; rebuilt if the package
    changed under it. Returns the data folder to train on."""
    from gpt2fast import data

    options = data.PrepareOptions(val_fraction=0.05)
    _prepare_once(data, folder, options, None)
    n = parse_vocab(vocab)
    if n == 0:
        return folder
    target = folder_for(folder, vocab)
    own = target / VOCAB_FOLDER
    tokenizer = _load_vocab(own)
    if tokenizer is None or tokenizer.n_vocab != n:
        from gpt2fast.tokenizer import Tokenizer

        tokenizer = Tokenizer.train(_split_texts(folder, "train"), n, name=target.name)
        target.mkdir(parents=True, exist_ok=True)
        tokenizer.save(own)
        log(f"learned a {n}-token BPE vocabulary from the packaged corpus's training split: {own}")
    _prepare_once(data, target, options, tokenizer)
    return target


def folder_for(folder: Path, vocab: str) -> Path:
    """Where ``prepare(folder, vocab)`` puts the data to train on."""
    n = parse_vocab(vocab)
    return folder if n == 0 else folder.with_name(f"{folder.name}-corpus{n}")


def vocab_dir(data_dir: Path) -> Optional[Path]:
    """The data's own vocabulary folder, or None when it was tokenized with GPT-2's."""
    folder = Path(data_dir) / VOCAB_FOLDER
    return folder if all((folder / name).is_file() for name in VOCAB_FILES) else None


def tokenizer_for(data_dir: Path):
    """The tokenizer the data in ``data_dir`` was prepared with: its own vocabulary if it has one, else GPT-2's."""
    from gpt2fast.tokenizer import Tokenizer

    return _load_vocab(Path(data_dir) / VOCAB_FOLDER) or Tokenizer.gpt2()


def split_bytes(data_dir: Path, split: str, tokenizer) -> Tuple[int, int]:
    """(tokens, UTF-8 bytes of the text they spell) of a split, end-of-text tokens left out of the bytes."""
    from gpt2fast import data

    tokens = np.concatenate([np.asarray(t) for t in data.ShardDataset(data_dir, split).chunks()]) \
        if data.read_manifest(data_dir)["splits"][split]["tokens"] else np.zeros(0, np.uint16)
    ids = tokens[tokens != tokenizer.eot_token].astype(np.int64).tolist()
    return int(tokens.size), len(tokenizer.decode_bytes(ids))


def bits_per_byte(nats_per_token: float, tokens: int, nbytes: int) -> float:
    return nats_per_token * tokens / max(1, nbytes) / math.log(2)


# ------------------------------------------------------------------------------------------- helpers
def _load_vocab(vocab_dir: Path):
    from gpt2fast.tokenizer import Tokenizer

    if (vocab_dir / "encoder.json").is_file() and (vocab_dir / "vocab.bpe").is_file():
        return Tokenizer.from_files(vocab_dir / "encoder.json", vocab_dir / "vocab.bpe", name=vocab_dir.parent.name)
    return None


def _split_texts(folder: Path, split: str) -> list:
    """The documents of a split prepared with GPT-2's tokens, as text (GPT-2's byte-level BPE is lossless)."""
    from gpt2fast import data
    from gpt2fast.tokenizer import Tokenizer

    gpt2 = Tokenizer.gpt2()
    tokens = np.concatenate([np.asarray(t) for t in data.ShardDataset(folder, split).chunks()])
    cuts = np.flatnonzero(tokens == gpt2.eot_token)
    docs = np.split(tokens, cuts)
    return [gpt2.decode(d[d != gpt2.eot_token].astype(np.int64).tolist()) for d in docs if d.size > 1]


def _prepare_once(data, folder: Path, options, tokenizer) -> None:
    kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
    try:
        data.prepare([], folder, options, log=lambda s: None, **kwargs)
    except data.DataError:  # prepared by another version of the package: build it again
        data.prepare([], folder, options, force=True, log=lambda s: None, **kwargs)
