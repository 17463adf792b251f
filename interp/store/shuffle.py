"""A keyed pseudo-random permutation of ``range(n)``, computed position by position.

Shuffling an epoch of a billion rows with ``rng.permutation`` needs an 8 GB index array. Here the
row at epoch position ``i`` is ``RowPermutation(n, key)[i]``, computed on demand for just the
positions of one batch, so memory and start-up time do not depend on ``n``.

Construction: a Feistel network over the square domain ``m x m`` (``m = ceil(sqrt(n))``): a
position ``x`` is split into ``(x // m, x % m)`` and each round maps ``(L, R) -> (R, (L + F(R)) mod
m)``, which is a bijection whatever the round function ``F`` (here the splitmix64 finaliser of
``R xor key``: a bare multiplicative hash steps almost linearly in ``R``, which left consecutive
positions a near-constant number of rows apart).
Six rounds of it are a bijection of ``[0, m^2)``; positions that land in ``[n, m^2)`` (fewer than
``2 sqrt(n)`` of them) are mapped again until they land below ``n`` ("cycle walking"), which keeps
it a bijection of ``[0, n)``.

``F`` only ever sees ``R < m``, so up to ``TABLE_LIMIT`` values of ``m`` (about 4e12 rows) each
round's ``F`` is tabulated once per permutation (6 x m x 8 bytes: 1.5 MB for a billion rows) and a
batch looks it up instead of hashing: the same permutation, about 3x faster per batch.
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 6
TABLE_LIMIT = 2**21  # tabulate F while m is at most this (48 MB of tables at the limit)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's multipliers
_S30, _S27, _S31, _HIGH = (np.uint64(s) for s in (30, 27, 31, 32))


class RowPermutation:
    """A bijection of ``[0, n)`` drawn from ``key`` (any sequence of ints, e.g. ``[seed, epoch]``)."""

    def __init__(self, n: int, key: list[int] | tuple[int, ...]):
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n = n
        self.m = max(1, math.isqrt(n - 1) + 1)  # m^2 >= n
        if self.m >= 2**32:
            raise ValueError(f"n={n} is too large (at most {2**64 - 1} rows)")
        self.keys = np.random.default_rng(list(key)).integers(0, 2**63, ROUNDS, dtype=np.uint64)
        everything = np.arange(self.m, dtype=np.uint64)
        self.tables = [self._hash(everything, key).astype(np.int64) for key in self.keys] if self.m <= TABLE_LIMIT else None

    def __getitem__(self, positions: np.ndarray | slice) -> np.ndarray:
        """The rows (int64) at epoch ``positions`` (an int array or a slice of ``range(n)``)."""
        if isinstance(positions, slice):  # in range by construction
            x = np.arange(*positions.indices(self.n), dtype=np.int64)
        else:
            x = np.asarray(positions)
            if x.size and (int(x.max()) >= self.n or int(x.min()) < 0):
                raise IndexError(f"positions must be in [0, {self.n})")
        y = self._rounds(x.astype(np.int64 if self.tables is not None else np.uint64, copy=False))
        outside = np.flatnonzero(y >= self.n)
        while outside.size:  # cycle walking: at most a few steps, on a handful of positions
            y[outside] = self._rounds(y[outside])
            outside = outside[y[outside] >= self.n]
        return y.astype(np.int64, copy=False)

    def _hash(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        """F(R): the high 32 bits of splitmix64(R ^ key), scaled onto [0, m) without a division."""
        m = np.uint64(self.m)
        with np.errstate(over="ignore"):  # the hash multiplies modulo 2^64 on purpose
            z = right ^ key
            z = (z ^ (z >> _S30)) * _MIX1
            z = (z ^ (z >> _S27)) * _MIX2
            z ^= z >> _S31
            return ((z >> _HIGH) * m) >> _HIGH

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        """The six rounds on positions ``x`` (int64 where ``F`` is tabulated, else uint64)."""
        if self.tables is not None:  # int64 throughout (values stay below 2m < 2^23): lookups need no index cast
            m = self.m
            left = x // m  # floor_divide by a scalar is several times faster than divmod
            right = x - left * m
            for table in self.tables:
                total = table[right]
                total += left  # below 2m: (total - m) mod 2^64 is huge exactly when total < m
                as_unsigned = total.view(np.uint64)
                np.minimum(as_unsigned, as_unsigned - np.uint64(m), out=as_unsigned)
                left, right = right, total
            return left * m + right
        m = np.uint64(self.m)
        left, right = np.divmod(x, m)
        for key in self.keys:
            total = left + self._hash(right, key)
            total -= m * (total >= m)
            left, right = right, total
        return left * m + right
