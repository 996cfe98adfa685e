"""Grain pipeline over the feature cache: shuffle per epoch, repeat, slice by JAX process, read with
threads, draw anchors, batch, and lay each batch out on the mesh as global jax.Arrays.

    source -> MapDataset (index, record) -> shuffle(seed) -> repeat -> (epoch, ...)
    -> [process::processes] -> anchors -> to_iter_dataset(ReadOptions) -> batch
    (TensorStore: -> batch reading the features into it -> thread prefetch)

The source is any cache format (`pipeline.cache.open_cache`): ArrayRecord parts (read through
Grain's ArrayRecordDataSource), TensorStore parts, or a multi-process dump. TensorStore features
skip the per-element copy: elements carry ids, mask, anchors and the record's row, and the batch
step reads each sequence's features straight into the batch array (`read_features_into`: one
os.preadv of a plain chunk file; no Python bytes, no np.stack), in a prefetch thread of its own.
Batch arrays are reused once nothing refers to them any more (`_BufferPool`): a fresh one per
batch cost more CPU in page faults than the read itself.
A multi-process cache read by as many processes as dumped it is sliced by host instead: process
p reads only host p's sub-cache (its own rows, which may live on host-local storage), shuffled
on its own.
Every element is a pure function of its position in the stream, so the iterator state Grain saves
(a position) restores the exact following batches, and the anchors of a sequence depend only on
(seed, epoch, sequence index). The saved state records the process count: positions are per
process, so restoring under another count is refused.
Nothing here changes process-wide allocator settings: they would also govern XLA's allocations
(a process-wide mallopt once grew the trainer's heap to 21 GB; issue 11).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from pathlib import Path


def _drop_grain_profiling_notice(record: logging.LogRecord) -> bool:
    # Grain 0.2.18 logs at import that its multiprocess worker *profiling* needs jaxlib >= 0.11
    # (easydel pins jax 0.9.2). Nothing here uses that profiler; the line only worried users at
    # every trainer start. Only that one message is dropped.
    return not str(record.msg).startswith("Grain multiprocess worker profiling requires jaxlib")


logging.getLogger("absl").addFilter(_drop_grain_profiling_notice)

import grain  # noqa: E402  (after the filter: the notice is logged at import)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.cache import CacheManifest, CacheReader, decode_record, open_cache
from pipeline.cache.format import BF16
from pipeline.errors import UserError
from train.anchors import draw_anchors


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
    """ArrayRecord parts through Grain's own source (its reads are thread-safe), decoded.
    Riegeli checks the hash of each record's chunk as it reads it: a failed read (or a record
    of the wrong size) becomes one CacheError line naming the part and the record."""

    def __init__(self, reader: CacheReader):
        self._source = grain.sources.ArrayRecordDataSource(reader.grain_paths)  # key i = seq i
        self._reader = reader
        self._manifest = reader.manifest

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i) -> dict:
        try:
            return decode_record(self._source[i], self._manifest)
        except (RuntimeError, ValueError, OSError) as e:
            raise self._reader.read_error(int(i), e) from None


def _records(reader):
    return _ArrayRecordRecords(reader) if isinstance(reader, CacheReader) else reader


def _reads_into_batch(reader) -> bool:
    """Whether the reader can read a record's features straight into a batch row (TensorStore)."""
    return callable(getattr(reader, "read_features_into", None))


def features_checked_on_device(reader) -> bool:
    """Whether the step checks this cache's features (pipeline/cache/feature_sums.py): its
    reader reads into batches and every part stores feature sums. Then the loader skips the
    host hash of the features and the batch carries their sums; otherwise (older dumps,
    ArrayRecord parts) the features are checked on the host as they are read."""
    return _reads_into_batch(reader) and bool(getattr(reader, "has_feature_sums", bool)())


class _TokensOnly:
    """A direct-read source's records without features: ids, mask and the row to read later
    (and with `feature_sums` the features' sums, read here in Grain's read threads)."""

    def __init__(self, reader, feature_sums: bool = False):
        self._reader, self._sums = reader, feature_sums

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, i) -> dict:
        rec = (self._reader.read_tokens(int(i), feature_sums=True) if self._sums
               else self._reader.read_tokens(int(i)))
        return dict(rec, row=int(i))


class _BufferPool:
    """[B, T, F] feature arrays reused across batches, at most `keep` of them.

    A fresh array per batch cost about a quarter of the loader's CPU: glibc mmaps allocations of
    this size and unmaps them when freed, so the kernel faults in and zero-fills every page again
    (0.57-0.82 -> 0.47-0.59 CPU s/GB with reuse; docs/BENCHMARKS.md section 2). An array is
    handed out again only when nothing outside the pool refers to it or to its memory: no batch
    dict, no view, no jax.Array that aliases it, no host-to-device copy still reading it (jax
    holds a reference to the numpy array until then). A consumer can keep batches as long as it
    likes; while it does, the pool allocates fresh arrays, as before. Arrays are page-aligned
    (so jax.device_put on CPU may use their memory instead of copying it). Process-wide
    allocator settings are not touched."""

    _ALIGN = 4096

    def __init__(self, shape, keep: int):
        self._shape, self._keep = tuple(shape), max(1, keep)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] = []  # (owner of the memory, array)
        self._lock = threading.Lock()  # a restarted prefetch thread may overlap the old one
        self.allocated = 0  # arrays made so far (tests, benches)
        self._free_refs = self._refs(self._aligned((1,)))  # references when nobody else has it

    @staticmethod
    def _refs(entry) -> tuple[int, int]:
        # a view of the array has the owner as its base (numpy collapses view chains), so both
        return sys.getrefcount(entry[0]), sys.getrefcount(entry[1])

    @classmethod
    def _aligned(cls, shape) -> tuple[np.ndarray, np.ndarray]:
        nbytes = int(np.prod(shape)) * BF16.itemsize
        owner = np.empty(nbytes + cls._ALIGN, np.uint8)
        skip = -owner.ctypes.data % cls._ALIGN
        return owner, owner[skip:skip + nbytes].view(BF16).reshape(shape)

    def take(self, batch: int) -> np.ndarray:
        shape = (batch, *self._shape)
        with self._lock:
            for entry in self._arrays:
                if entry[1].shape == shape and self._refs(entry) <= self._free_refs:
                    return entry[1]
            entry = self._aligned(shape)
            self.allocated += 1
            if len(self._arrays) < self._keep:
                self._arrays.append(entry)
            return entry[1]

    def __getstate__(self):  # a worker process builds its own arrays
        return {"_shape": self._shape, "_keep": self._keep, "_free_refs": self._free_refs}

    def __setstate__(self, d):
        self.__dict__.update(d, _arrays=[], _lock=threading.Lock(), allocated=0)


class _BatchInto:
    """Grain batch_fn for direct-read sources: stacks the small arrays and reads every sequence's
    features into one [B, T, F] array (the reads issued together, then awaited), taken from a
    pool of `keep` arrays reused once their batch is released (`_BufferPool`)."""

    def __init__(self, reader, keep: int, device_checks: bool = False):
        self._reader, self._device_checks = reader, device_checks
        self.pool = _BufferPool((reader.manifest.seq_len, reader.manifest.feature_dim), keep)

    def __call__(self, elements) -> dict:
        features = self.pool.take(len(elements))
        check_here = not self._device_checks  # else the step checks the feature sums
        futures = [self._reader.read_features_into(int(e["row"]), features[j], check_here)
                   for j, e in enumerate(elements)]
        batch = {k: np.stack([e[k] for e in elements]) for k in elements[0] if k != "row"}
        for f in futures:
            f.result()
        batch["features"] = features
        return batch


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
        out = {"input_ids": np.asarray(rec["input_ids"], np.int32),
               "loss_mask": np.asarray(rec["loss_mask"]),
               "anchors": anchors, "anchor_valid": valid,
               "index": np.int64(index), "epoch": np.int64(epoch)}
        if "row" in rec:  # features are read into the batch (_BatchInto)
            out["row"] = rec["row"]
            if "feature_sums" in rec:  # checked by the step against the features
                out["feature_sums"] = rec["feature_sums"]
        elif "features" in rec:  # (online training's records are tokens: train/online.py)
            out["features"] = np.asarray(rec["features"])
        return out


def num_anchors_for(manifest: CacheManifest, anchors_per_seq: int) -> int:
    """Static anchors per sequence: the flag, capped by the T-1 positions that can be anchors."""
    return max(1, min(anchors_per_seq, manifest.seq_len - 1))


class ProcessDataset:
    """The per-process batch stream; `iter()` gives a `ProcessIterator`."""

    def __init__(self, dataset, process_count: int, buffers: _BufferPool | None = None):
        self._dataset, self.process_count = dataset, process_count
        self.buffers = buffers  # the batch arrays' pool (direct-read sources), for benches/tests

    def __iter__(self) -> "ProcessIterator":
        return ProcessIterator(iter(self._dataset), self.process_count)


def _close_boxed(box: list) -> None:
    """Close the Grain iterator in `box` and drop it (so its __del__ runs now, not at teardown)."""
    it = box.pop() if box else None
    if callable(getattr(it, "close", None)):
        it.close()


class ProcessIterator:
    """Grain's iterator, with the process count in its state (what the checkpoint stores).

    Closed at interpreter exit at the latest: a prefetch thread still inside a TensorStore read
    when Python finalizes would abort the process ("terminate called ...")."""

    def __init__(self, it, process_count: int):
        self._box, self.process_count = [it], process_count
        self.close = weakref.finalize(self, _close_boxed, self._box)  # runs once; at exit too

    @property
    def _it(self):
        if not self._box:
            raise ValueError("the data iterator was closed")
        return self._box[0]

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
                 process_index: int | None = None, process_count: int | None = None,
                 device_checks: bool | None = None):
    """The infinite per-process batch stream (numpy dicts, leading dim global/processes).
    `device_checks` (default: `features_checked_on_device(cache)`): batches carry the feature
    sums the step checks, and the features are not hashed on the host.

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
        reader, index_of = view.reader, view.global_index
        seed_p, stride = (seed ^ (pi * 0x9E3779B9)) % 2**32, 1
    else:
        reader, index_of, seed_p, stride = cache, None, seed % 2**32, pc
    direct = _reads_into_batch(reader)
    if device_checks is None:
        device_checks = features_checked_on_device(reader)
    if device_checks and not direct:
        raise ValueError("device checks need a reader that reads features into batches")
    source = _Indexed(_TokensOnly(reader, device_checks) if direct else _records(reader),
                      index_of)
    n = len(source)
    ds = grain.MapDataset.source(source).shuffle(seed=seed_p).repeat(None)
    ds = ds.map_with_index(lambda i, item: (i // n, item))  # epoch of each stream position
    if stride > 1:
        ds = ds[pi::pc]
    ds = ds.map(_Draw(num_anchors_for(manifest, anchors_per_seq), seed))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))
    batch = global_batch // pc
    if not direct:
        return ProcessDataset(ds.batch(batch, drop_remainder=True), pc)
    ahead = max(1, prefetch // batch)
    # arrays: `ahead` prefetched batches, one being filled, one the loop holds (train/memory.py)
    batch_fn = _BatchInto(reader, keep=ahead + 2, device_checks=device_checks)
    ds = ds.batch(batch, drop_remainder=True, batch_fn=batch_fn)
    # the features are read in the batch step: a thread runs it ahead (state: the consumed one's)
    return ProcessDataset(grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=ahead), pc, batch_fn.pool)


def to_global(batch: dict, shardings: dict, keys=None) -> dict:
    """Per-process numpy batch -> global jax.Arrays laid out by `shardings` (batch over
    data x fsdp); only `keys` (default: those of `shardings`, what the step consumes)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
            for k in (shardings if keys is None else keys)}
