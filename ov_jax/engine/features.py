"""A cache of projected vision features, keyed by a hash of the pixel values (LRU, bounded in bytes).

The same image (or video) in a later request skips the vision tower: its tower inputs hash to the same key,
and the cached per-chunk features are exactly what the tower would compute again (same executables, same
inputs), so results with and without the cache are identical.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Sequence

import numpy as np


def pixel_key(tower_inputs: np.ndarray, chunk: int) -> str:
    """sha256 of the tiles/frames (shape, dtype and bytes) and the tower chunk size they are encoded with."""
    x = np.ascontiguousarray(tower_inputs)
    digest = hashlib.sha256(f"{x.shape}|{x.dtype}|{chunk}|".encode())
    digest.update(memoryview(x).cast("B"))
    return digest.hexdigest()


class FeatureCache:
    """LRU map ``pixel_key → per-chunk features`` holding at most ``max_bytes`` of features (device memory).

    An entry larger than ``max_bytes`` is not kept. ``hits`` / ``misses`` count lookups. Thread-safe."""

    def __init__(self, max_bytes: int):
        if int(max_bytes) < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[str, tuple[list, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> list | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return list(entry[0])

    def put(self, key: str, features: Sequence) -> None:
        size = sum(int(f.nbytes) for f in features)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (list(features), size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
