"""The held-out split: which cache sequences are never trained on, and the training view without
them.

Held out = the `count` sequences with the smallest splitmix64 hash of (seed, global index): a
pure function of (number of sequences, fraction, cap, seed), so every process, every resume and
every later run on the same cache computes the same split, and it does not depend on how the
cache was sharded or dumped. The training stream is the loader's usual pipeline over the
remaining sequences (`TrainView` presents them as a cache to `train.loader.make_dataset`), so
shuffling, resume positions and per-process slicing work as before, over fewer sequences.
"""
from __future__ import annotations

import numpy as np

from train.loader import _records, _reads_into_batch

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
    return x ^ (x >> np.uint64(31))


def heldout_count(n: int, fraction: float, cap: int) -> int:
    """round(fraction * n), at least 1 when fraction > 0, at most `cap`, and never all of them."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(max(1, round(fraction * n)), cap, n - 1))


def heldout_indices(n: int, fraction: float, cap: int, seed: int) -> np.ndarray:
    """Sorted global indices (int64) of the held-out sequences of a cache of n."""
    k = heldout_count(n, fraction, cap)
    if k == 0:
        return np.zeros(0, np.int64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.arange(n, dtype=np.uint64)
                          ^ _splitmix64(np.full(n, seed % 2**64, np.uint64)))
    return np.sort(np.argsort(key, kind="stable")[:k]).astype(np.int64)


class _Rows:
    """A reader's records restricted to `rows` (position i = record rows[i]), with the reader's
    direct-read methods when it has them (TensorStore: the loader reads features into batches)."""

    def __init__(self, reader, rows: np.ndarray):
        self.manifest, self._rows = reader.manifest, np.asarray(rows, np.int64)
        if _reads_into_batch(reader):
            self._records = reader
            self.read_tokens = lambda i, **kw: reader.read_tokens(int(self._rows[i]), **kw)
            self.read_features_into = lambda i, out, check=True: reader.read_features_into(
                int(self._rows[i]), out, check)
            self.has_feature_sums = reader.has_feature_sums
        else:  # ArrayRecord parts through Grain's thread-safe source, as the loader reads them
            self._records = _records(reader)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i) -> dict:
        return self._records[int(self._rows[int(i)])]


class _View:
    """Host p's training rows of a multi-process cache (the loader's `process_view` contract)."""

    def __init__(self, view, rows: np.ndarray):
        self.reader, self._view, self._rows = _Rows(view.reader, rows), view, rows
        self.manifest = view.manifest

    def global_index(self, j: int) -> int:
        return self._view.global_index(int(self._rows[int(j)]))


class TrainView:
    """The cache minus the held-out sequences, for `make_dataset`."""

    def __init__(self, cache, heldout: np.ndarray):
        self._cache, self.manifest = cache, cache.manifest
        self._held = np.asarray(heldout, np.int64)
        self._all = _Rows(cache, np.setdiff1d(np.arange(len(cache)), self._held))
        if _reads_into_batch(self._all):
            self.read_tokens, self.read_features_into = (self._all.read_tokens,
                                                         self._all.read_features_into)
            self.has_feature_sums = self._all.has_feature_sums

    def __len__(self) -> int:
        return len(self._all)

    def __getitem__(self, i) -> dict:
        return self._all[i]

    def process_view(self, index: int, count: int) -> _View:
        view = self._cache.process_view(index, count)
        glob = np.asarray([view.global_index(j) for j in range(len(view))], np.int64)
        return _View(view, np.flatnonzero(~np.isin(glob, self._held)))
