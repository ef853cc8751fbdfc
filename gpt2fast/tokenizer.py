"""GPT-2's byte-level BPE tokenizer over a native C++ core.

    >>> from gpt2fast import Tokenizer
    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]

The encoding is token-for-token GPT-2's (tiktoken's ``gpt2``). Special tokens follow tiktoken's rules:
text that spells a special token is an error unless you say how to treat it, through ``allowed_special``
(encode it as the special token) or ``disallowed_special`` (encode it as plain text).

Command line: ``python -m gpt2fast.tokenizer {encode,decode,train,bench} --help``.
"""
from __future__ import annotations

import codecs
import functools
import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal, Optional, Sequence, Union

from gpt2fast import _bpe
from gpt2fast._io import write_atomic

VocabularyError = _bpe.VocabularyError
EOT = "<|endoftext|>"

SpecialSet = Union[Literal["all"], AbstractSet[str], Collection[str]]


class Tokenizer:
    """A byte-level BPE vocabulary with encode/decode. Immutable and safe to share between threads."""

    def __init__(self, core: _bpe.CoreBPE, name: str = "custom"):
        self._core = core
        self.name = name
        self._special_tokens = {text: int(i) for text, i in core.specials()}
        self._special_names = frozenset(self._special_tokens)
        self._special_by_index = [text for text, _ in core.specials()]
        self._default_policy = ([], list(range(len(self._special_by_index))))  # nothing allowed, all checked

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's vocabulary (50,257 tokens), from the copy shipped inside the package. Loaded once."""
        return _gpt2_tokenizer()

    @classmethod
    def from_files(cls, encoder_json: Union[str, os.PathLike], vocab_bpe: Union[str, os.PathLike],
                   name: Optional[str] = None) -> Tokenizer:
        """Load GPT-2's file format: ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges in order)."""
        encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
        try:
            core = _bpe.CoreBPE.from_gpt2_files(encoder_json.read_bytes(), vocab_bpe.read_bytes())
        except VocabularyError as e:
            raise VocabularyError(f"{e} (files: {encoder_json}, {vocab_bpe})") from None
        return cls(core, name or vocab_bpe.parent.name or "custom")

    @classmethod
    def from_tiktoken(cls, path: Union[str, os.PathLike], special_tokens: Optional[dict] = None,
                      name: Optional[str] = None) -> Tokenizer:
        """Load a tiktoken ranks file (``<base64 token> <rank>`` per line).

        ``special_tokens`` maps text to id; by default ``<|endoftext|>`` takes the id after the last rank
        (50256 for GPT-2's ranks)."""
        path = Path(path)
        data = path.read_bytes()
        if special_tokens is None:
            n_ranks = sum(1 for line in data.splitlines() if line.strip())
            special_tokens = {EOT: n_ranks}
        try:
            core = _bpe.CoreBPE.from_tiktoken(data, sorted(special_tokens.items(), key=lambda kv: kv[1]))
        except VocabularyError as e:
            raise VocabularyError(f"{e} (file: {path})") from None
        return cls(core, name or path.stem)

    # ---------------------------------------------------------------------------------- encoding
    def encode_ordinary(self, text: str) -> list:
        """Token ids of ``text``, treating special-token text as ordinary text."""
        return self._core.encode_ordinary(text)

    def encode(self, text: str, *, allowed_special: SpecialSet = frozenset(),
               disallowed_special: SpecialSet = "all") -> list:
        """Token ids of ``text``.

        ``allowed_special``: special tokens to encode as such when their text appears ("all" for every one).
        ``disallowed_special``: special tokens whose text is an error ("all": every one not allowed);
        pass ``()`` to encode such text as ordinary text instead."""
        allowed, disallowed = self._special_policy(allowed_special, disallowed_special)
        if disallowed:
            self._raise_if_special(text, disallowed)
        if not allowed:
            return self._core.encode_ordinary(text)
        return self._core.encode(text, allowed)

    def encode_ordinary_batch(self, texts: Sequence[str], *, num_threads: Optional[int] = None) -> list:
        """``encode_ordinary`` of each text, in parallel on ``num_threads`` native threads (default: all cores)."""
        return self._core.encode_batch(_as_list(texts), [], True, num_threads)

    def encode_batch(self, texts: Sequence[str], *, num_threads: Optional[int] = None,
                     allowed_special: SpecialSet = frozenset(), disallowed_special: SpecialSet = "all") -> list:
        """``encode`` of each text, in parallel on ``num_threads`` native threads (default: all cores)."""
        texts = _as_list(texts)
        allowed, disallowed = self._special_policy(allowed_special, disallowed_special)
        if disallowed:
            for i, text in enumerate(texts):
                self._raise_if_special(text, disallowed, where=f"texts[{i}]")
        return self._core.encode_batch(texts, allowed, not allowed, num_threads)

    def pretokenize(self, text: str) -> list:
        """The pieces GPT-2's pre-tokenizer cuts ``text`` into; BPE never merges across them."""
        return _bpe.pretokenize(text)

    # ---------------------------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for. Raises ValueError for an id outside the vocabulary."""
        return self._core.decode_bytes(_as_sequence(ids))

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text the ids stand for; bytes that are not valid UTF-8 become U+FFFD (``errors="replace"``)."""
        return self._core.decode_bytes(_as_sequence(ids)).decode("utf-8", errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._core.token_bytes(token)

    def stream_decoder(self, errors: str = "replace") -> StreamDecoder:
        """A decoder fed ids a few at a time that only ever returns whole characters."""
        return StreamDecoder(self, errors)

    # -------------------------------------------------------------------------------- vocabulary
    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def eot_token(self) -> int:
        try:
            return self._special_tokens[EOT]
        except KeyError:
            raise AttributeError(f"this vocabulary has no {EOT} token; its special tokens are "
                                 f"{sorted(self._special_tokens)}") from None

    @property
    def special_tokens(self) -> dict:
        return dict(self._special_tokens)

    @property
    def special_tokens_set(self) -> frozenset:
        return self._special_names

    def token_id(self, token: bytes) -> Optional[int]:
        """The id of an ordinary token given by its bytes, or None."""
        return self._core.rank_of(token)

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name!r} n_vocab={self.n_vocab}>"

    def __reduce__(self):
        # Picklable, for worker processes: GPT-2's shipped vocabulary by reference, any other by value.
        if _gpt2_tokenizer.cache_info().currsize and self is _gpt2_tokenizer():  # without loading GPT-2
            return (Tokenizer.gpt2, ())
        return (_rebuild, (self._core.ordinary_tokens(), self._core.specials(), self._core.merges(), self.name))

    # -------------------------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Union[str, Iterable[str]], vocab_size: int,
              special_tokens: Sequence[str] = (EOT,), *, num_threads: Optional[int] = None,
              name: str = "trained") -> Tokenizer:
        """Learn a byte-level BPE vocabulary of ``vocab_size`` tokens from ``texts``, the GPT-2 way.

        The 256 byte tokens come first (in GPT-2's byte order), then one token per merge, then the
        special tokens. Texts are cut at special-token text and pre-tokenized with GPT-2's rules, so
        merges never cross those boundaries. Each step merges the most frequent adjacent pair, ties going
        to the pair with the smaller (left id, right id); the result is deterministic and does not depend on
        ``num_threads``. If the texts run out of pairs first, the vocabulary is smaller (with a warning)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        special_tokens = list(special_tokens)
        for s in special_tokens:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r} must be a non-empty str")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens lists a token twice: {special_tokens}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE vocabulary holds the 256 "
                             f"byte tokens plus {len(special_tokens)} special token(s), so it needs at least "
                             f"{minimum}")
        tokens, merges = _bpe.train(texts, vocab_size - len(special_tokens), special_tokens, num_threads)
        if len(tokens) + len(special_tokens) < vocab_size:
            warnings.warn(f"the texts ran out of pairs to merge after {len(merges)} merges: the vocabulary has "
                          f"{len(tokens) + len(special_tokens)} tokens, not {vocab_size}", stacklevel=2)
        specials = [(s, len(tokens) + i) for i, s in enumerate(special_tokens)]
        return cls(_bpe.CoreBPE(tokens, specials, merges), name)

    # -------------------------------------------------------------------------------- saving
    def save(self, directory: Union[str, os.PathLike]) -> tuple:
        """Write ``encoder.json`` and ``vocab.bpe`` (GPT-2's format) into ``directory``; returns their paths.

        Each file is written to a temporary name and renamed, so a failure never leaves a half-written one."""
        merges = self._core.merges()
        tokens = self._core.ordinary_tokens()
        to_text = _bpe.bytes_to_gpt2_text
        encoder = {to_text(t): i for i, t in enumerate(tokens)}
        encoder.update(self._special_tokens)
        merge_lines = "".join(f"{to_text(tokens[a])} {to_text(tokens[b])}\n" for a, b in merges)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        enc_path, bpe_path = directory / "encoder.json", directory / "vocab.bpe"
        write_atomic(enc_path, json.dumps(encoder, ensure_ascii=False).encode("utf-8"))
        write_atomic(bpe_path, ("#version: 0.2\n" + merge_lines).encode("utf-8"))
        return enc_path, bpe_path

    def save_tiktoken(self, path: Union[str, os.PathLike]) -> Path:
        """Write the ordinary tokens in tiktoken's ranks format (special tokens are not part of it)."""
        import base64

        lines = b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(self._core.ordinary_tokens()))
        path = Path(path)
        write_atomic(path, lines)
        return path

    # -------------------------------------------------------------------------------- internals
    def _special_policy(self, allowed_special: SpecialSet, disallowed_special: SpecialSet):
        if disallowed_special == "all" and not allowed_special:
            return self._default_policy
        allowed = self._special_names if allowed_special == "all" else frozenset(allowed_special)
        unknown = allowed - self._special_names
        if unknown:
            raise ValueError(f"allowed_special names {sorted(unknown)}, which this vocabulary does not have; "
                             f"its special tokens are {sorted(self._special_names)}")
        if disallowed_special == "all":
            disallowed = self._special_names - allowed
        else:
            disallowed = frozenset(disallowed_special)
            unknown = disallowed - self._special_names
            if unknown:
                raise ValueError(f"disallowed_special names {sorted(unknown)}, which this vocabulary does not "
                                 f"have; its special tokens are {sorted(self._special_names)}")
        index = {name: k for k, name in enumerate(self._special_by_index)}
        return sorted(index[n] for n in allowed), sorted(index[n] for n in disallowed)

    def _raise_if_special(self, text: str, disallowed: list, where: str = "the text") -> None:
        found = self._core.find_special(text, disallowed)
        if found is None:
            return
        k, position = found
        token = self._special_by_index[k]
        raise ValueError(
            f"{where} contains the special token {token!r} at character {position}, and special tokens are "
            f"disallowed by default. To encode it as the special token (id {self._special_tokens[token]}), pass "
            f"allowed_special={{{token!r}}} (or allowed_special='all'); to encode it as ordinary text, pass "
            f"disallowed_special=() or use encode_ordinary().")


class StreamDecoder:
    """Decodes ids as they arrive (e.g. while sampling) without ever splitting a multi-byte character:
    bytes of an unfinished character wait for the next ids. Call ``flush()`` at the end."""

    def __init__(self, tokenizer: Tokenizer, errors: str = "replace"):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors)

    def feed(self, ids: Union[int, Iterable[int]]) -> str:
        if isinstance(ids, int):
            ids = (ids,)
        return self._decoder.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is left: an unfinished character at the very end becomes U+FFFD (with "replace")."""
        return self._decoder.decode(b"", final=True)


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer() -> Tokenizer:
    assets = resources.files("gpt2fast") / "assets"
    encoder_json = (assets / "encoder.json").read_bytes()
    vocab_bpe = (assets / "vocab.bpe").read_bytes()
    return Tokenizer(_bpe.CoreBPE.from_gpt2_files(encoder_json, vocab_bpe), "gpt2")


def _rebuild(tokens: list, specials: list, merges: list, name: str) -> Tokenizer:
    return Tokenizer(_bpe.CoreBPE(tokens, specials, merges), name)


def _as_list(texts) -> list:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of str, not a single str (wrap it: [text])")
    return texts if isinstance(texts, list) else list(texts)


def _as_sequence(ids):
    if isinstance(ids, (list, tuple)):
        return ids
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        return ids.tolist()
    return list(ids)


if __name__ == "__main__":
    from gpt2fast.tokenizer_cli import main

    raise SystemExit(main())
