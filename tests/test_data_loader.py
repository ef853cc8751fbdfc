"""gpt2fast.data.loader: TokenLoader's windows (deterministic, one epoch sees each once, ranks disjoint, exact
resume), its errors, and the unigram entropy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_testing import split_tokens

from gpt2fast.data import ConfigError, DataError, TokenLoader, unigram_entropy

pytest_plugins = ["data_testing"]


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
    with pytest.raises(DataError, match="not a TokenLoader state"):
        wrong_seed.load_state_dict({"kind": "something else"})
    with pytest.raises(DataError, match="bad position -1"):
        wrong_seed.load_state_dict({**wrong_seed.state_dict(), "position": -1})


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
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1, got 0"):
        TokenLoader(out, "train", 0, 8)


def test_unigram_entropy(prepared):
    out, _ = prepared
    tokens = split_tokens(out, "train")
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    assert unigram_entropy(out, "train") == pytest.approx(-(p * np.log(p)).sum())
    assert unigram_entropy(out, "train", "bits") == pytest.approx(-(p * np.log2(p)).sum())
    with pytest.raises(ValueError, match="unit"):
        unigram_entropy(out, "train", "bans")
