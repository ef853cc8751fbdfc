"""What the trainer reads: batches of token windows from a prepared split (``TokenLoader``), and the split's
unigram entropy, the loss floor a model must beat to show it learned more than token frequencies.

torch is imported only when a batch is drawn, so the data pipeline runs without it."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from gpt2fast.data.shards import MAX_VOCAB, PathLike, ShardDataset
from gpt2fast.errors import ConfigError, DataError

_STATE_KIND = "gpt2fast.data.TokenLoader"


class TokenLoader:
    """Batches of (x, y) int64 tensors of shape (batch_size, block_size), y = x shifted by one token.

    How windows are drawn: the split is cut into non-overlapping windows of ``block_size + 1`` tokens;
    every epoch moves the cut by a random offset and shuffles the windows (both drawn from ``seed`` and
    the epoch number), so each token is seen about once per epoch, at a different position each time.
    Step k takes the global windows ``[k*G, (k+1)*G)`` of that sequence, ``G = batch_size * world_size``,
    and ``rank`` takes rows ``[rank*batch_size, (rank+1)*batch_size)`` of it: ranks never share a window
    within an epoch, and ``world_size`` ranks together see exactly the batches one process with
    ``batch_size * world_size`` would. The shuffled order of one epoch is kept in memory
    (4 bytes per window).

    ``state_dict()`` is the global position; ``load_state_dict`` resumes so that the next batch is the one
    an uninterrupted loader would have given (and, if batch_size or world_size changed, the stream goes on
    from the same global window).

    Every shard's header and size are checked against the manifest when the loader is made; ``verify=True``
    checks each shard's sha256 too, which reads all of the split once."""

    def __init__(self, out_dir: PathLike, split: str = "train", batch_size: int = 8, block_size: int = 1024,
                 seed: int = 0, rank: int = 0, world_size: int = 1, *, dataset: Optional[ShardDataset] = None,
                 verify: bool = False):
        for name, value, low in (("batch_size", batch_size, 1), ("block_size", block_size, 1), ("seed", seed, 0),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank {rank} is not below world_size {world_size}: ranks count from 0")
        self.dataset = dataset if dataset is not None else ShardDataset(out_dir, split)
        if verify:
            self.dataset.verify()
        self.split, self.batch_size, self.block_size = split, int(batch_size), int(block_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        n, span = self.dataset.num_tokens, self.block_size + 1
        if n < span:
            raise DataError(f"the {split!r} split of {self.dataset.out_dir} has {n:,} tokens, fewer than "
                            f"block_size + 1 = {span:,}: use a smaller block_size (context) or more data")
        # One window fewer than fits, so that the random offset of each epoch has room to move the cut.
        self.windows_per_epoch = n // span - 1 if n >= 2 * span else 1
        self._max_offset = n - self.windows_per_epoch * span
        self.position = 0  # global index of the next window to draw
        self._epochs: Dict[int, Tuple[int, np.ndarray]] = {}  # epoch -> (offset, window order); two at most

    def _epoch(self, epoch: int) -> Tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            offset = int(rng.integers(0, self._max_offset + 1))
            order = rng.permutation(self.windows_per_epoch).astype(np.uint32 if self.windows_per_epoch < 2 ** 32
                                                                   else np.int64)
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (offset, order)
        return self._epochs[epoch]

    def window_starts(self) -> np.ndarray:
        """Token offsets of this rank's windows in the next batch (without drawing it)."""
        first = self.position + self.rank * self.batch_size
        starts = np.empty(self.batch_size, np.int64)
        for j in range(self.batch_size):
            epoch, index = divmod(first + j, self.windows_per_epoch)
            offset, order = self._epoch(epoch)
            starts[j] = offset + int(order[index]) * (self.block_size + 1)
        return starts

    def next_batch(self):
        import torch

        span = self.block_size + 1
        windows = np.stack([self.dataset.read(int(s), span) for s in self.window_starts()]).astype(np.int64)
        self.position += self.batch_size * self.world_size
        t = torch.from_numpy(windows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": _STATE_KIND, "version": 1, "split": self.split, "seed": self.seed,
                "block_size": self.block_size, "num_tokens": self.dataset.num_tokens, "position": self.position,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            raise DataError(f"not a TokenLoader state: {state!r:.200}; give what TokenLoader.state_dict() returned")
        mine = {"split": self.split, "seed": self.seed, "block_size": self.block_size,
                "num_tokens": self.dataset.num_tokens}
        mismatched = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if mismatched:
            raise ConfigError("cannot resume this loader from a state saved with other data or settings: "
                              + "; ".join(mismatched) + "; resume with the data and settings it was saved with")
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise DataError(f"TokenLoader state has a bad position {position!r}; it must be an int >= 0")
        self.position = position


def unigram_entropy(out_dir: PathLike, split: str = "val", unit: str = "nats") -> float:
    """The entropy of the split's token frequencies, per token: ``-sum p log p`` over the token ids, with
    ``p`` each id's share of the split's tokens (``<|endoftext|>`` included).

    In nats by default (``unit="bits"`` for bits), the unit of PyTorch's cross-entropy loss. It is the
    lowest loss any model that ignores context (a fixed distribution over tokens) can reach on this very
    split, so a validation loss below it shows the model learned more than word frequencies."""
    if unit not in ("nats", "bits"):
        raise ConfigError(f"unit must be 'nats' or 'bits', got {unit!r}")
    ds = ShardDataset(out_dir, split)
    if ds.num_tokens == 0:
        raise DataError(f"the {split!r} split of {out_dir} has no tokens; prepare more data into it")
    counts = np.zeros(MAX_VOCAB, np.int64)
    for chunk in ds.chunks():
        counts += np.bincount(chunk, minlength=MAX_VOCAB)
    p = counts[counts > 0] / ds.num_tokens
    h = float(-(p * np.log(p)).sum())
    return h / math.log(2) if unit == "bits" else h
