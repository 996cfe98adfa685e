"""Grain pipeline over the feature cache: shuffle per epoch, repeat, slice by JAX process, read with
threads, draw anchors, batch, and lay each batch out on the mesh as global jax.Arrays.

    source -> MapDataset (index, record) -> shuffle(seed) -> repeat -> (epoch, ...)
    -> [process::processes] -> anchors -> to_iter_dataset(ReadOptions) -> batch

The source is any cache format (`pipeline.cache.open_cache`): ArrayRecord parts (read through
Grain's ArrayRecordDataSource), TensorStore parts, or a multi-process dump. A multi-process cache
read by as many processes as dumped it is sliced by host instead: process p reads only host p's
sub-cache (its own rows, which may live on host-local storage), shuffled on its own.
Every element is a pure function of its position in the stream, so the iterator state Grain saves
(a position) restores the exact following batches, and the anchors of a sequence depend only on
(seed, epoch, sequence index). The saved state records the process count: positions are per
process, so restoring under another count is refused.
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


def open_training_cache(data_dir: str | Path):
    """The cache reader (`pipeline.cache.open_cache`: ArrayRecord, TensorStore or multi-process);
    refuses an unfinished dump, a cache whose files are gone, or features not stored as bf16,
    each with one line."""
    cache = open_cache(data_dir)
    if cache.manifest.dtype != "bfloat16":
        raise UserError(f"{data_dir}: features stored as {cache.manifest.dtype}, the trainer "
                        "reads bfloat16 caches")
    if isinstance(cache, CacheReader):
        missing = [p for p in cache.paths if not Path(p).exists()]
        if missing:
            raise UserError(f"{data_dir}: {len(missing)} part file(s) listed in the manifest are "
                            f"missing, e.g. {missing[0]}")
    if len(cache) == 0:
        raise UserError(f"{data_dir}: the cache holds no sequences")
    return cache


class _ArrayRecordRecords:
    """ArrayRecord parts through Grain's own source (its reads are thread-safe), decoded."""

    def __init__(self, reader: CacheReader):
        self._source = grain.sources.ArrayRecordDataSource(reader.grain_paths)  # key i = seq i
        self._manifest = reader.manifest

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i) -> dict:
        return decode_record(self._source[i], self._manifest)


def _records(reader):
    return _ArrayRecordRecords(reader) if isinstance(reader, CacheReader) else reader


class _Indexed:
    """Random-access source yielding (sequence index, record dict): the anchor draw needs the
    sequence's (global) identity after the shuffle."""

    def __init__(self, records, index_of=None):
        self._records, self._index_of = records, index_of

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        index = int(i) if self._index_of is None else self._index_of(int(i))
        return index, self._records[i]


class _Draw:
    """(epoch, (index, record)) -> numpy dict with the sequence and its anchors for this epoch."""

    def __init__(self, num_anchors: int, seed: int):
        self.num_anchors, self.seed = num_anchors, seed

    def __call__(self, item):
        epoch, (index, rec) = item
        anchors, valid = draw_anchors(rec["loss_mask"], self.num_anchors, seed=self.seed,
                                      epoch=epoch, index=index)
        return {"input_ids": np.asarray(rec["input_ids"], np.int32),
                "loss_mask": np.asarray(rec["loss_mask"]), "features": np.asarray(rec["features"]),
                "anchors": anchors, "anchor_valid": valid,
                "index": np.int64(index), "epoch": np.int64(epoch)}


def num_anchors_for(manifest: CacheManifest, anchors_per_seq: int) -> int:
    """Static anchors per sequence: the flag, capped by the T-1 positions that can be anchors."""
    return max(1, min(anchors_per_seq, manifest.seq_len - 1))


class ProcessDataset:
    """The per-process batch stream; `iter()` gives a `ProcessIterator`."""

    def __init__(self, dataset, process_count: int):
        self._dataset, self.process_count = dataset, process_count

    def __iter__(self) -> "ProcessIterator":
        return ProcessIterator(iter(self._dataset), self.process_count)


class ProcessIterator:
    """Grain's iterator, with the process count in its state (what the checkpoint stores)."""

    def __init__(self, it, process_count: int):
        self._it, self.process_count = it, process_count

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return {"process_count": self.process_count, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        saved = state.get("process_count")
        if saved != self.process_count:
            raise UserError(f"the checkpoint's data position was saved by {saved} JAX process(es), "
                            f"this run has {self.process_count}: each process's position is its "
                            f"own, so resume with {saved} processes (or start a new --out)")
        self._it.set_state(state["grain"])


def make_dataset(cache, *, global_batch: int,
                 anchors_per_seq: int, seed: int, read_threads: int = 8, prefetch: int = 64,
                 process_index: int | None = None, process_count: int | None = None):
    """The infinite per-process batch stream (numpy dicts, leading dim global/processes).

    Call `iter(...)` on it; the iterator's get_state/set_state is what the checkpoint stores.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise UserError(f"--batch-size {global_batch} is not divisible by {pc} processes")
    manifest = cache.manifest
    if manifest.hosts > 1 and manifest.hosts == pc:
        # host-sliced: this process's rows are host pi's sub-cache, shuffled on their own
        view = cache.process_view(pi, pc)
        source = _Indexed(_records(view.reader), view.global_index)
        seed_p, stride = (seed ^ (pi * 0x9E3779B9)) % 2**32, 1
    else:
        source, seed_p, stride = _Indexed(_records(cache)), seed % 2**32, pc
    n = len(source)
    ds = grain.MapDataset.source(source).shuffle(seed=seed_p).repeat(None)
    ds = ds.map_with_index(lambda i, item: (i // n, item))  # epoch of each stream position
    if stride > 1:
        ds = ds[pi::pc]
    ds = ds.map(_Draw(num_anchors_for(manifest, anchors_per_seq), seed))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))
    return ProcessDataset(ds.batch(global_batch // pc, drop_remainder=True), pc)


def to_global(batch: dict, shardings: dict) -> dict:
    """Per-process numpy batch -> global jax.Arrays laid out by `shardings` (batch over
    data x fsdp); only the keys the step consumes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
            for k in DEVICE_KEYS}
