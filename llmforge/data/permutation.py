"""A seeded permutation of [0, n) in O(1) memory: a Feistel network with cycle-walking.

``permute(x, n, key)`` maps positions to a shuffled order without ever materialising the order: each
position is encrypted by a Feistel network over k bits (the smallest power of two 2^k >= n; the halves
are k - k//2 and k//2 bits, their widths alternating from round to round), and a value that falls outside
[0, n) is encrypted again until it lands inside (cycle-walking). A Feistel network is a bijection on its
2^k values whatever its round function, and cycle-walking restricts a bijection of a larger range to a
bijection of [0, n), so ``permute(., n, key)`` is a permutation of [0, n) for every key. The range is
below 2n, so a value needs fewer than 2 encryptions on average.

The round function is SplitMix64's finaliser (a strong 64-bit mixer) of the right half and a round key;
keys are derived from the caller's 64-bit key, so a sampler keys each epoch with ``mix(seed, epoch)``.
Everything is vectorised over numpy arrays of uint64 (wrapping arithmetic): ~10-20M positions a second.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROUND_KEYS = [np.uint64((r * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) for r in range(ROUNDS)]


def mix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche of 64-bit words (wrapping uint64 arithmetic)."""
    z = np.array(x, dtype=np.uint64, ndmin=1)
    with np.errstate(over="ignore"):
        _mix_inplace(z)
    return z.reshape(np.shape(x))


def _mix_inplace(z: np.ndarray) -> None:
    """mix64 on a 1-d uint64 array, in place (arrays wrap silently; the caller silences scalars)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)


def derive_key(*parts: int | np.ndarray) -> np.uint64 | np.ndarray:
    """A 64-bit key from integers (seed, epoch, block, ...), order-sensitive; parts may be arrays (one key
    per element, broadcast)."""
    h: np.ndarray = np.asarray(np.uint64(0x243F6A8885A308D3))
    with np.errstate(over="ignore"):
        for p in parts:
            word = (
                np.asarray(p).astype(np.int64).astype(np.uint64)
                if np.ndim(p)
                else np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF)
            )
            h = mix64(h ^ (word + _GOLDEN))
    return h if h.ndim else np.uint64(h[()])


def range_bits(n: int) -> int:
    """k such that the Feistel range 2^k is the smallest power of two >= n (at least 4)."""
    return max(2, int(n - 1).bit_length())


def _encrypt(x: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """An unbalanced Feistel network on k-bit values: halves of a and b = k - a bits; each round XORs
    a mix of the right half into the left one and swaps them (so the widths alternate); a bijection."""
    a, b = k - k // 2, k // 2
    for r in range(ROUNDS):
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        f = right ^ keys
        if r:
            f += _ROUND_KEYS[r]  # 1-d arrays: wrapping, no warning
        _mix_inplace(f)
        f &= np.uint64((1 << a) - 1)
        f ^= left
        x = (right << np.uint64(a)) | f
        a, b = b, a
    return x


def permute(x: np.ndarray | int, n: int, key: np.ndarray | int) -> np.ndarray:
    """The images of positions ``x`` (each in [0, n)) under the permutation of [0, n) named by ``key``
    (one key, or one per position: positions of different epochs or blocks in one call)."""
    if n <= 0:
        raise ValueError(f"cannot permute an empty range (n={n})")
    x = np.asarray(x, dtype=np.uint64)
    shape = x.shape
    x = x.reshape(-1)
    if x.size and int(x.max()) >= n:
        raise ValueError(f"position {int(x.max())} outside [0, {n})")
    keys = np.broadcast_to(np.asarray(key, dtype=np.uint64), shape).reshape(-1)
    k = range_bits(n)
    out = _encrypt(x, keys, k)
    todo = np.nonzero(out >= np.uint64(n))[0]
    while todo.size:  # cycle-walking: re-encrypt until the value is inside [0, n)
        out[todo] = _encrypt(out[todo], keys[todo], k)
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64).reshape(shape)
