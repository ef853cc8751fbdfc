"""Shared fixtures: the repository's data, and tiktoken's GPT-2 encoding built offline as the reference."""
from __future__ import annotations

import os

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; it must be switched on
# before Triton is first imported.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _gpu = torch.cuda.is_available()
    except ImportError:
        _gpu = False
    if not _gpu:
        os.environ["TRITON_INTERPRET"] = "1"

import gzip
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CORPUS_DIR = SHARED_DATA / "corpus"
ASSETS = REPO / "gpt2fast" / "assets"

# tiktoken's spelling of GPT-2's pre-tokenization pattern (the same language as GPT-2's original).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def read_jsonl_gz(path: Path) -> list:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def tok():
    from gpt2fast import Tokenizer

    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding, built from the vocabulary files we ship (no network)."""
    pytest.importorskip("tiktoken")
    import tiktoken.load

    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(ASSETS / "vocab.bpe"), encoder_json_file=str(ASSETS / "encoder.json"))
    return tiktoken.Encoding("gpt2-reference", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="session")
def corpus_documents() -> dict:
    """{file name: [documents]} for every file of ../shared/data/corpus."""
    files = sorted(CORPUS_DIR.glob("*.jsonl.gz"))
    if not files:
        pytest.skip(f"the shared corpus is not at {CORPUS_DIR}")
    return {f.name: read_jsonl_gz(f) for f in files}


@pytest.fixture(scope="session")
def small_documents() -> list:
    """A few hundred KB of real text that is always there: the corpus shipped in the package."""
    return read_jsonl_gz(ASSETS / "mobydick.jsonl.gz")


@pytest.fixture
def cpu_without_interpreter(monkeypatch):
    """The situation of a CPU-only machine outside the tests: Triton present but no interpreter (and the
    once-per-reason fallback warnings not yet given)."""
    from gpt2fast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_dispatch, "_warned", set())


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, small_documents):
    """Shards of 25 Moby-Dick chapters (a fifth held out for validation), prepared once per session."""
    from gpt2fast import data

    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in small_documents[:25]:
            f.write(json.dumps({"text": doc}) + "\n")
    out = tmp_path_factory.mktemp("shards")
    data.prepare([folder / "docs.jsonl"], out, data.PrepareOptions(val_fraction=0.2), log=lambda s: None)
    return out


@pytest.fixture
def stand_in(monkeypatch):
    """The CUDA custom operators over tests/cuda_standin.py's plain-PyTorch binding, for this test only."""
    import cuda_standin

    return cuda_standin.install(monkeypatch)
