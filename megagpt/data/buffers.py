"""Large arrays used again once nothing references them.

A fresh multi-megabyte array costs a page fault (and the kernel zeroing a
page) for every 4 KiB on first touch: for the loader's shard buffers and
batch groups that is ~1 ns a token, as much as the rest of the work.  The
pool hands an array out again only when its reference count shows that no
view of it (a window, a tensor made by torch.from_numpy) is alive anywhere,
so reuse can never overwrite data still in use.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


class BufferPool:
    def __init__(self, keep: int = 4):
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised array of `shape` and `dtype` (C order)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        need = count * dtype.itemsize
        with self._lock:
            for i in range(len(self._arrays)):
                # 2 references: the list's and getrefcount's argument; any view adds one
                if self._arrays[i].nbytes >= need and sys.getrefcount(self._arrays[i]) == 2:
                    return self._arrays[i][:need].view(dtype).reshape(shape)
            base = np.empty(max(need, 1), dtype=np.uint8)
            if len(self._arrays) < self.keep:
                self._arrays.append(base)
            else:  # all busy: replace the smallest free one, if any, so that the pool follows the sizes asked
                free = [i for i in range(len(self._arrays)) if sys.getrefcount(self._arrays[i]) == 2]
                if free:
                    self._arrays[min(free, key=lambda i: self._arrays[i].nbytes)] = base
            return base[:need].view(dtype).reshape(shape)
