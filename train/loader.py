"""Grain pipeline over the feature cache: shuffle per epoch, repeat, slice by JAX process, read with
threads, draw anchors, batch, and lay each batch out on the mesh as global jax.Arrays.

    ArrayRecordDataSource -> MapDataset (index, record) -> shuffle(seed) -> repeat -> (epoch, ...)
    -> [process::processes] -> decode + anchors -> to_iter_dataset(ReadOptions) -> batch

Every element is a pure function of its position in the stream, so the iterator state Grain saves
(a position) restores the exact following batches, and the anchors of a sequence depend only on
(seed, epoch, sequence index).
"""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import numpy as np

from pipeline.cache import CacheManifest, CacheReader, decode_record, open_cache
from pipeline.errors import UserError
from train.anchors import draw_anchors

# What the device step consumes; everything else in an element is for tests and logs.
DEVICE_KEYS = ("input_ids", "loss_mask", "features", "anchors", "anchor_valid")


def open_training_cache(data_dir: str | Path) -> CacheReader:
    """The cache reader (`pipeline.cache.open_cache`); refuses an unfinished dump, a cache whose
    files are gone, or features not stored as bf16, each with one line."""
    cache = open_cache(data_dir)
    if cache.manifest.dtype != "bfloat16":
        raise UserError(f"{data_dir}: features stored as {cache.manifest.dtype}, the trainer "
                        "reads bfloat16 caches")
    missing = [p for p in cache.paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{data_dir}: {len(missing)} part file(s) listed in the manifest are "
                        f"missing, e.g. {missing[0]}")
    if len(cache) == 0:
        raise UserError(f"{data_dir}: the cache holds no sequences")
    return cache


class _Indexed:
    """Random-access source yielding (sequence index, record bytes): the anchor draw needs the
    sequence's identity after the shuffle."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        return int(i), self._source[i]


class _DecodeAndDraw:
    """(epoch, (index, bytes)) -> numpy dict with the sequence and its anchors for this epoch."""

    def __init__(self, manifest: CacheManifest, num_anchors: int, seed: int):
        self.manifest, self.num_anchors, self.seed = manifest, num_anchors, seed

    def __call__(self, item):
        epoch, (index, buf) = item
        rec = decode_record(buf, self.manifest)
        anchors, valid = draw_anchors(rec["loss_mask"], self.num_anchors, seed=self.seed,
                                      epoch=epoch, index=index)
        return {"input_ids": rec["input_ids"].astype(np.int32), "loss_mask": rec["loss_mask"],
                "features": rec["features"], "anchors": anchors, "anchor_valid": valid,
                "index": np.int64(index), "epoch": np.int64(epoch)}


def num_anchors_for(manifest: CacheManifest, anchors_per_seq: int) -> int:
    """Static anchors per sequence: the flag, capped by the T-1 positions that can be anchors."""
    return max(1, min(anchors_per_seq, manifest.seq_len - 1))


def make_dataset(cache: CacheReader, *, global_batch: int,
                 anchors_per_seq: int, seed: int, read_threads: int = 8, prefetch: int = 64,
                 process_index: int | None = None, process_count: int | None = None):
    """The infinite IterDataset of per-process batches (numpy dicts, leading dim global/processes).

    Call `iter(...)` on it; the iterator's get_state/set_state is what the checkpoint stores.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise UserError(f"--batch-size {global_batch} is not divisible by {pc} processes")
    manifest = cache.manifest
    source = grain.sources.ArrayRecordDataSource(cache.grain_paths)  # key i = sequence i
    n = len(source)
    ds = grain.MapDataset.source(_Indexed(source)).shuffle(seed=seed % 2**32).repeat(None)
    ds = ds.map_with_index(lambda i, item: (i // n, item))  # epoch of each stream position
    ds = ds[pi::pc]
    ds = ds.map(_DecodeAndDraw(manifest, num_anchors_for(manifest, anchors_per_seq), seed))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))
    return ds.batch(global_batch // pc, drop_remainder=True)


def to_global(batch: dict, shardings: dict) -> dict:
    """Per-process numpy batch -> global jax.Arrays laid out by `shardings` (batch over
    data x fsdp); only the keys the step consumes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
            for k in DEVICE_KEYS}
