"""Orders that are fixed functions of integers: the shard order of an epoch,
the shuffle of a block of windows, a mixture's schedule.

They are SplitMix64 hash orders rather than seeded numpy Generators: a
permutation is the argsort of n hashes of its key, and many keys are hashed in
one call, so a shuffle block costs about 1 us instead of the ~50 us of
seeding a Generator for it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_GOLDEN, _MUL1, _MUL2, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1
# As numpy scalars once: mixing Python ints into uint64 arithmetic would promote or overflow.
_U = {k: np.uint64(v) for k, v in (("golden", _GOLDEN), ("m1", _MUL1), ("m2", _MUL2), (30, 30), (27, 27), (31, 31))}


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array, in place (wrapping arithmetic)."""
    x ^= x >> _U[30]
    x *= _U["m1"]
    x ^= x >> _U[27]
    x *= _U["m2"]
    x ^= x >> _U[31]
    return x


def _key_hash(key: Sequence[int]) -> int:
    h = np.zeros(1, dtype=np.uint64)
    for k in key:
        h = _splitmix((h ^ np.uint64(k & _MASK)) + _U["golden"])
    return int(h[0])


def permutations(n: int, key: Sequence[int], last: Sequence[int]) -> np.ndarray:
    """Row j: a permutation of range(n) that is a fixed function of the
    integers (*key, last[j]): the order of n SplitMix64 hashes of (key, last[j], i).
    Many at once (one call per 64 shuffle blocks, ~1 us a block, where seeding
    a numpy Generator per block cost ~50 us)."""
    h = _splitmix((np.asarray(last, dtype=np.int64).astype(np.uint64) ^ np.uint64(_key_hash(key))) + _U["golden"])
    x = h[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _U["golden"]
    return np.argsort(_splitmix(x), axis=1, kind="stable")


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) that is a fixed function of the integers in `key`."""
    return permutations(n, key[:-1], [key[-1]])[0]


class BlockPermutations:
    """permutation(n, *key, block) for increasing blocks, made 64 at a time:
    a stream asks for its blocks in order, so one call serves the next 64."""

    def __init__(self, n: int, *key: int):
        self.n, self.key = n, key
        self.first = 0  # the block of rows[0]
        self.rows = np.empty((0, n), dtype=np.int64)

    def __call__(self, block: int) -> np.ndarray:
        if not self.first <= block < self.first + len(self.rows):
            self.first, self.rows = block, permutations(self.n, self.key, np.arange(block, block + 64))
        return self.rows[block - self.first]


def default_num_streams(n_shards: int, world_size: int, preferred: int = 16) -> int:
    """The largest multiple of the world size not above min(preferred, shards)."""
    cap = max(min(preferred, n_shards), world_size)
    return (cap // world_size) * world_size
