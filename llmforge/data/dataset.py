"""Packing and sampling over token shards.

`PackedWindows` views a split as one token stream (documents already end with EOS) cut into windows of
``seq_len + 1`` tokens that start every ``seq_len`` tokens, so each token is an input exactly once and a
target exactly once per epoch. The last window is padded with -1 (collate functions turn it into PAD and
an ignored label).

`GlobalCursorSampler` orders samples by a *global* cursor: position p of the stream of samples is
``permutation(epoch = p // n)[p % n]``, with one seeded permutation per epoch (a Feistel bijection computed
per position, `llmforge.data.permutation`: no array of n indices is ever built). A global batch covers
``batch_size * world_size`` consecutive positions and rank r takes its own contiguous slice, so ranks see
disjoint samples and a run resumed at cursor c continues exactly where it stopped, whatever the number of
ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

from llmforge.data.permutation import derive_key, permute
from llmforge.data.shards import ShardSet

PAD_VALUE = -1


class PackedWindows(Dataset):
    def __init__(self, shards: ShardSet, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        self.arrays = shards.arrays
        self.seq_len = seq_len
        sizes = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.starts[-1])
        self.length = max(0, -(-(self.total - 1) // seq_len))  # ceil((N - 1) / L): windows with a target

    def __len__(self) -> int:
        return self.length

    def span(self, i: int) -> tuple[int, int]:
        """Stream positions [start, end) of window i (end may stop short on the last window)."""
        start = i * self.seq_len
        return start, min(start + self.seq_len + 1, self.total)

    def read(self, start: int, end: int) -> np.ndarray:
        out = np.full(self.seq_len + 1, PAD_VALUE, dtype=np.int64)
        pos, shard = start, int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            local = pos - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - pos
            out[pos - start : pos - start + take] = self.arrays[shard][local : local + take]
            pos += take
            shard += 1
        return out

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"window {i} out of range [0, {self.length})")
        return {"index": i, "tokens": self.read(*self.span(i))}


class GlobalCursorSampler(Sampler[int]):
    """Endless, seeded, rank-sliced sampler that starts at a global sample cursor.

    The order of an epoch is a Feistel permutation (`llmforge.data.permutation`) keyed by (seed, epoch):
    O(1) memory whatever the number of windows, and any position's sample is computed directly.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("no samples to draw from: the split is shorter than one window")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.n, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start

    def orders(self, positions: np.ndarray) -> np.ndarray:
        """The samples at global stream positions (vectorised `order`)."""
        return epoch_order(np.asarray(positions, dtype=np.int64), self.n, self.seed, self.shuffle)

    def order(self, position: int) -> int:
        return int(self.orders(np.array([position]))[0])

    def __iter__(self) -> Iterator[int]:
        return rank_stream(self.orders, self.start, self.rank, self.batch_size, self.world_size)


LOOKAHEAD = 4096  # global positions whose samples a sampler computes per vectorised call


def rank_stream(
    orders: Callable[[np.ndarray], np.ndarray], start: int, rank: int, batch_size: int, world_size: int
) -> Iterator[int]:
    """The samples of one rank from global position ``start`` on: its ``batch_size`` positions of every
    global batch, computed ``LOOKAHEAD`` global positions at a time (the samples are a pure function of the
    position, so looking ahead changes nothing; per batch, numpy's call overhead would dominate)."""
    global_batch = batch_size * world_size
    batches = max(1, LOOKAHEAD // global_batch)
    offsets = (np.arange(batches)[:, None] * global_batch + np.arange(batch_size)[None, :]).ravel()
    position = start + rank * batch_size
    while True:
        yield from orders(position + offsets).tolist()
        position += batches * global_batch


def epoch_order(positions: np.ndarray, n: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Position p of an endless stream over [0, n): ``perm(seed, epoch = p // n)[p % n]``."""
    epochs, offsets = np.divmod(positions, n)
    if not shuffle:
        return offsets
    uniq, inverse = np.unique(epochs, return_inverse=True)  # a batch spans one epoch, rarely two
    return permute(offsets, n, derive_key(seed, uniq)[inverse])
