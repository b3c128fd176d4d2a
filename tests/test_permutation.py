"""The O(1)-memory Feistel permutation behind the samplers: a bijection on every range, seeded, spread."""

from __future__ import annotations

import numpy as np
import pytest

from llmforge.data.permutation import derive_key, permute, range_bits


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 15, 16, 17, 63, 64, 65, 100, 257, 1000, 4095, 4097, 65537])
def test_bijection_on_small_ranges(n):
    for key in (0, 1, 12345, 2**63 + 5):
        image = permute(np.arange(n), n, key)
        assert image.dtype == np.int64
        assert np.array_equal(np.sort(image), np.arange(n)), (n, key)


def test_keys_give_different_orders_and_scalars_agree():
    n = 1000
    a, b = permute(np.arange(n), n, derive_key(1, 0)), permute(np.arange(n), n, derive_key(1, 1))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(n))
    assert int(permute(7, n, derive_key(1, 0))) == a[7]
    # one key per position: positions of two epochs in one call equal two separate calls
    keys = np.array([derive_key(1, 0)] * n + [derive_key(1, 1)] * n, dtype=np.uint64)
    assert np.array_equal(permute(np.concatenate([np.arange(n)] * 2), n, keys), np.concatenate([a, b]))


def test_derive_key_is_order_sensitive():
    assert derive_key(1, 2) != derive_key(2, 1)
    assert derive_key(1, 2) == derive_key(1, 2)


def test_looks_shuffled():
    """Neighbouring positions land far apart, and each output decile gets ~10% of any input block."""
    n = 100_000
    image = permute(np.arange(n), n, derive_key(9, 0))
    assert np.abs(np.diff(image[:1000])).mean() > n / 5
    counts = np.bincount(image[:10_000] * 10 // n, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150, counts


def test_large_range_without_materialising():
    n = 10**12  # ~5e8 windows is the 1e12-token run; 1e12 works the same way
    x = np.arange(10**12 - 1000, 10**12)
    y = permute(x, n, derive_key(3, 0))
    assert ((0 <= y) & (y < n)).all() and np.unique(y).size == 1000
    assert range_bits(n) == 40


def test_out_of_range_is_refused():
    with pytest.raises(ValueError, match="outside"):
        permute(np.array([10]), 10, 0)
    with pytest.raises(ValueError, match="empty"):
        permute(np.array([0]), 0, 0)
