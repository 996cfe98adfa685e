"""TensorStore (zarr3) parts of a feature cache: `--format tensorstore`, beside ArrayRecord.

The commit protocol, layout, ledger and manifest are the ArrayRecord cache's (cache_format.py):
only what a *part* is changes. A part is a key prefix `shard-SSSSS-of-NNNNN.part-PPPPP.ts/`
under the cache's data root (the cache directory, or the TensorStore kvstore URL recorded in the
manifest, e.g. gs://bucket/cache/), holding a jagged, token-major layout:

    features/   zarr3 bfloat16 [tokens, F]  chunks of whole sequences, >= ~64 MiB per write
    input_ids/  zarr3 int32    [tokens]
    loss_mask/  zarr3 uint8    [tokens]
    offsets/    zarr3 int64    [records + 1]   sequence r is tokens offsets[r]:offsets[r+1]
    checksums/  zarr3 uint64   [records, 3]    xxh3_64 of sequence r's features bytes, and of
                                               its input_ids (int32 LE) then loss_mask bytes;
                                               its two feature sums (feature_sums.py) packed
                                               as sum0 | sum1 << 32, which the trainer checks
                                               on the device (older dumps: [records, 2])

Chunks are plain (`PLAIN_CODECS`: uncompressed, unsharded), so a sequence's features are one
byte range of one chunk file, which the trainer reads straight into its batch (`plain_chunk_files`;
parts written before this, TensorStore sharded into [1024, 960] inner chunks, read as well).
A part is written chunk by chunk (the writer buffers one chunk), resized to what it holds and
closed before the ledger names it; its committed size and CRC32 cover every key and value under
its prefix, so verification and resume treat it exactly as an ArrayRecord file.
Every read checks the record's `checksums` row before the bytes are handed out (features hashed
block by block as they are preadv'd, while still in cache); a mismatch raises CacheError naming
the part and the record. The trainer's batch reads skip the features' host hash when the parts
store feature sums (`has_feature_sums`): its step checks those on the device instead. They sit
in the `checksums` array a reader opens anyway: a default dump has 4 records a part, so in a
shuffled epoch nearly every record read opens its part, and each array opened costs ~0.5 ms. Parts written before the checksums existed are verified whole (size and
CRC32 of the part) the first time a reader opens them.
No jax import: the trainer reads caches through this module.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import re
import threading
import zlib
from pathlib import Path

import numpy as np
import xxhash

from pipeline.cache import feature_sums as fsums
from pipeline.cache.format import BF16, CacheError, CacheManifest, PartInfo, decode_record
from pipeline.cache.plain_chunks import (  # noqa: F401  (plain_chunk_files, _pread_into: tests)
    PLAIN_CODECS, _pread_into, _small_plain_array, plain_chunk_files)

TS_SUFFIX = ".ts"
PART_RE = re.compile(r"^(shard-\d+-of-\d+\.part-\d+\.ts)/")
CHUNK_TARGET_BYTES = 64 << 20  # one write (and one read of a whole chunk) per ~64 MiB
ARRAYS = ("features", "input_ids", "loss_mask", "offsets")
CHECKSUMS = "checksums"  # [records, 3] uint64: xxh3_64 of features, of input_ids + loss_mask;
# the feature sums packed (sum0 | sum1 << 32); parts dumped before the sums: [records, 2]
_MAX_OPEN_PARTS = 16
_PREAD_THREADS = 2  # os.preadv's of plain chunk files in flight per reader (they drop the GIL)


def _ts():
    import tensorstore as ts  # imported lazily: ArrayRecord-only users never load it
    return ts


def root_url(directory, kvstore: str | None) -> str:
    """The data root as a kvstore URL ending in '/': `kvstore`, or the cache directory."""
    from pathlib import Path
    url = kvstore if kvstore else "file://" + str(Path(directory).resolve())
    return url if url.endswith("/") else url + "/"


def open_kvstore(url: str):
    from pipeline.errors import UserError
    try:
        return _ts().KvStore.open(url).result()
    except (ValueError, RuntimeError) as e:
        raise UserError(f"cannot open the TensorStore kvstore {url}: {e}") from None


def _prefix_range(prefix: str):
    ts = _ts()
    p = prefix.encode()
    return ts.KvStore.KeyRange(inclusive_min=p, exclusive_max=p[:-1] + bytes([p[-1] + 1]))


def part_names(kv) -> set[str]:
    """Names of the TS parts present under the root (committed or not)."""
    keys = kv.list(_ts().KvStore.KeyRange(inclusive_min=b"shard-", exclusive_max=b"shard.")).result()
    return {m.group(1) for k in keys if (m := PART_RE.match(k.decode(errors="replace")))}


def delete_part(kv, name: str) -> None:
    kv.delete_range(_prefix_range(name + "/")).result()


def part_checksum(kv, name: str, root: str | None = None) -> tuple[int, int]:
    """(bytes, CRC32) over every (key, value) under the part's prefix, in key order. Under a
    file:// `root` the values are streamed from their files in 4 MiB blocks (the same bytes):
    TensorStore would read each whole chunk (up to ~64 MiB and more) into buffers of its own
    threads, whose malloc arenas then keep the memory (issue 14: +100 MiB RSS in the dump)."""
    keys = sorted(kv.list(_prefix_range(name + "/")).result())
    local = Path(root[len("file://"):]) if root and root.startswith("file://") else None
    crc, size = 0, 0
    for key in keys:
        crc = zlib.crc32(key, crc)
        if local is None:
            value = kv.read(key).result().value
            crc, size = zlib.crc32(value, crc), size + len(value)
            continue
        with open(local / key.decode(), "rb") as fh:
            while block := fh.read(4 << 20):
                crc, size = zlib.crc32(block, crc), size + len(block)
    return size, crc


def chunk_records(seq_len: int, feature_dim: int, per_part: int) -> int:
    """Sequences per zarr chunk: whole sequences, at most about CHUNK_TARGET_BYTES of features,
    the part's sequences split into chunks as even as can be. Zarr stores every chunk whole, so
    4 sequences in chunks of 3 would store 6 (1.5x the bytes: T=1024 at gpt-oss width)."""
    per_seq = seq_len * feature_dim * BF16.itemsize
    most = max(1, min(per_part, math.ceil(CHUNK_TARGET_BYTES / max(per_seq, 1))))
    return math.ceil(per_part / math.ceil(per_part / most))


def _spec(url: str, dtype: str, shape, chunk) -> dict:
    return {"driver": "zarr3", "kvstore": url,
            "metadata": {"shape": list(shape), "data_type": dtype, "codecs": PLAIN_CODECS,
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": list(chunk)}}},
            "create": True, "delete_existing": True}


class TSPartWriter:
    """Writes one part: records (cache_format bytes) in, zarr3 chunks out; `close()` -> records."""

    def __init__(self, root: str, name: str, capacity: int, seq_len: int, feature_dim: int):
        ts = _ts()
        self.url, self.t, self.f = root + name + "/", seq_len, feature_dim
        self.capacity = capacity
        self.chunk = chunk_records(seq_len, feature_dim, capacity)
        tokens, ct = capacity * seq_len, self.chunk * seq_len
        self._arrays = {
            "features": ts.open(_spec(self.url + "features/", "bfloat16", [tokens, feature_dim],
                                      [ct, feature_dim])).result(),
            "input_ids": ts.open(_spec(self.url + "input_ids/", "int32", [tokens], [ct])).result(),
            "loss_mask": ts.open(_spec(self.url + "loss_mask/", "uint8", [tokens], [ct])).result(),
        }
        self._buf = None  # one chunk's arrays; a fresh set per chunk (see _flush)
        self.records = 0  # written to the buffer or flushed
        self._flushed = 0
        self._sums: list[tuple[int, int]] = []  # per record: (features, tokens) xxh3_64
        self._feature_sums: list[int] = []  # per record: sum0 | sum1 << 32 (feature_sums.py)

    def write(self, record: bytes, manifest, feature_sums=None) -> None:
        """Append a record; `feature_sums` as the dump's device computed them, else computed
        here on the host."""
        if self.records >= self.capacity:
            raise ValueError(f"part {self.url} is full ({self.capacity} records)")
        rec = decode_record(record, manifest)
        self._sums.append(record_checksums(rec["features"], rec["input_ids"], rec["loss_mask"]))
        fs = (fsums.feature_sums_np(rec["features"]) if feature_sums is None
              else np.asarray(feature_sums, np.uint32).reshape(2))
        self._feature_sums.append(int(fs[0]) | int(fs[1]) << 32)
        row = (self.records - self._flushed) * self.t
        if self._buf is None:
            ct = self.chunk * self.t
            self._buf = {"features": np.empty((ct, self.f), BF16),
                         "input_ids": np.empty(ct, np.int32), "loss_mask": np.empty(ct, np.uint8)}
        for key in ("features", "input_ids", "loss_mask"):
            self._buf[key][row:row + self.t] = rec[key]
        self.records += 1
        if self.records - self._flushed == self.chunk:
            self._flush()

    def _flush(self) -> None:
        n = (self.records - self._flushed) * self.t
        if n == 0:
            return
        lo = self._flushed * self.t
        # TensorStore may keep the chunk's arrays instead of copying them (no copy made in its
        # threads, whose malloc arenas would keep that memory: +100 MiB RSS in the dump); so
        # they are never written again, the next chunk gets new ones.
        futures = [a[lo:lo + n].write(self._buf[k][:n],
                                      can_reference_source_data_indefinitely=True)
                   for k, a in self._arrays.items()]
        for fut in futures:
            fut.result()
        self._flushed, self._buf = self.records, None

    def close(self) -> int:
        self._flush()
        tokens = self.records * self.t
        if self.records < self.capacity:  # drop the unused tail (and its shape) for good
            for k, a in self._arrays.items():
                shape = [tokens] + list(a.shape[1:])
                self._arrays[k] = a.resize(exclusive_max=shape, shrink_only=True).result()
        offsets = np.arange(self.records + 1, dtype=np.int64) * self.t
        ts = _ts()
        off = ts.open(_spec(self.url + "offsets/", "int64", [self.records + 1],
                            [self.records + 1])).result()
        off.write(offsets).result()
        n = max(self.records, 1)  # zarr needs a non-empty chunk shape
        sums = ts.open(_spec(self.url + CHECKSUMS + "/", "uint64", [self.records, 3],
                             [n, 3])).result()
        table = np.zeros((self.records, 3), np.uint64)
        table[:, :2] = np.asarray(self._sums, np.uint64).reshape(self.records, 2)
        table[:, 2] = np.asarray(self._feature_sums, np.uint64)
        sums.write(table).result()
        self._arrays = {}
        return self.records


def tokens_checksum(input_ids, loss_mask) -> int:
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(input_ids, "<i4"))
    h.update(np.ascontiguousarray(loss_mask, np.uint8))
    return h.intdigest()


def record_checksums(features, input_ids, loss_mask) -> tuple[int, int]:
    """(xxh3_64 of the features' bytes, of input_ids int32 LE + loss_mask bytes)."""
    feats = np.ascontiguousarray(features, BF16).reshape(-1).view(np.uint8)
    return (xxhash.xxh3_64_intdigest(feats),
            tokens_checksum(input_ids, loss_mask))


class TSCacheReader:
    """Random access and streaming over the committed TS parts of a cache, in sequence order.

    Same interface as `CacheReader` (`len`, `[i]` -> dict(input_ids, loss_mask, features),
    iteration, `verify()`), and a Grain `RandomAccessDataSource` as it is (picklable: handles are
    reopened lazily in each worker).
    """

    def __init__(self, directory, manifest, parts):
        self.directory = directory
        self.manifest = manifest
        self.root = root_url(directory, manifest.kvstore)
        self.parts = tuple(sorted(parts, key=lambda p: (p.part, p.shard)))
        self._starts = np.cumsum([0] + [p.records for p in self.parts])
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = None  # read_features_into's os.preadv threads, started on first use
        self._verified: set[int] = set()  # older parts (no checksums) verified whole
        self.pread_plain_chunks = True  # False: every read through TensorStore (to compare)
        self.check_records = True  # False: skip the per-record checksums (bench_loader only)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def paths(self) -> list[str]:
        return [self.root + p.file for p in self.parts]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_open"], d["_lock"], d["_pool"] = collections.OrderedDict(), None, None
        d["_verified"] = set()
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _part(self, k: int) -> dict:
        with self._lock:
            if k in self._open:
                self._open.move_to_end(k)
                return self._open[k]
        ts = _ts()
        part = self.parts[k]
        url = self.root + part.file + "/"
        arrays = {a: ts.open({"driver": "zarr3", "kvstore": url + a + "/"}, open=True,
                             read=True).result() for a in ARRAYS if a != "offsets"}
        offsets = _small_plain_array(self.root, part.file, "offsets", "int64")
        if offsets is None:
            offsets = ts.open({"driver": "zarr3", "kvstore": url + "offsets/"}, open=True,
                              read=True).result().read().result()
        arrays["offsets"] = offsets
        arrays["sums"] = self._checksums(k, url) if self.check_records else None
        arrays["plain"] = (plain_chunk_files(self.root, part.file, "features")
                           if self.pread_plain_chunks else None)
        with self._lock:
            self._open[k] = arrays
            while len(self._open) > _MAX_OPEN_PARTS:
                self._open.popitem(last=False)
        return arrays

    def _checksums(self, k: int, url: str):
        """Part k's per-record checksums [records, 2]; None for a part written before them,
        which is then verified whole (size, CRC32, record count) once per reader."""
        part = self.parts[k]
        sums = _small_plain_array(self.root, part.file, CHECKSUMS, "uint64")
        if sums is None:
            try:
                sums = _ts().open({"driver": "zarr3", "kvstore": url + CHECKSUMS + "/"},
                                  open=True, read=True).result().read().result()
            except ValueError:  # NOT_FOUND: an older part
                if k not in self._verified:
                    verify_part(open_kvstore(self.root), part, self.root)
                    self._verified.add(k)
                return None
        if sums.shape not in ((part.records, 2), (part.records, 3)):
            raise CacheError(f"{self.root + part.file}: checksums of {sums.shape[0]} records, "
                             f"the manifest committed {part.records} (corrupted part)")
        return sums

    def describe(self, index) -> str:
        """Where record `index` lives, for error lines: '<part> record j (cache record i)'."""
        _, _, _, k, j = self._locate(index)
        return f"{self.root + self.parts[k].file} record {j} (cache record {int(index)})"

    def has_feature_sums(self) -> bool:
        """Whether the parts store their records' feature sums (dumps since the device check;
        pipeline/cache/feature_sums.py): then the trainer checks features on the device. Only
        a resume across versions mixes parts with and without: the first and the last part are
        read here, and a part without them met later is refused (`_feature_sums_of`)."""
        kv = open_kvstore(self.root)
        for part in {self.parts[0], self.parts[-1]} if self.parts else ():
            got = kv.read(f"{part.file}/{CHECKSUMS}/zarr.json").result()
            try:
                shape = json.loads(got.value)["shape"] if got.state == "value" else None
            except (ValueError, KeyError, TypeError):
                shape = None
            if not isinstance(shape, list) or shape[1:] != [3]:
                return False
        return bool(self.parts)

    def feature_sums(self, index) -> np.ndarray:
        """Record `index`'s feature sums [2] uint32, as the dump computed them."""
        arrays, _, _, k, j = self._locate(index)
        return self._feature_sums_of(arrays, k, j)

    def _feature_sums_of(self, arrays: dict, k: int, j: int) -> np.ndarray:
        sums = arrays["sums"]
        if sums is None or sums.shape[1] < 3:
            raise CacheError(f"{self.root + self.parts[k].file} stores no feature sums while the "
                             "cache's other parts do (dumped by two versions); check it with "
                             f"`python -m pipeline.cache.verify {self.directory}`")
        packed = int(sums[j, 2])
        return np.array([packed & 0xFFFFFFFF, packed >> 32], np.uint32)

    def _locate(self, index) -> tuple[dict, int, int, int, int]:
        """Record index -> (its part's open arrays, first token, end token, part, row)."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for a cache of {len(self)}")
        index %= len(self)
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        arrays = self._part(k)
        j = index - int(self._starts[k])
        return arrays, int(arrays["offsets"][j]), int(arrays["offsets"][j + 1]), k, j

    def _bad(self, k: int, j: int, what: str):
        return CacheError(
            f"{self.root + self.parts[k].file} record {j} (cache record "
            f"{int(self._starts[k]) + j}) is corrupted: its {what} do not match the checksum "
            f"written by the dump; nothing was trained on it. Check the whole cache with "
            f"`python -m pipeline.cache.verify {self.directory}` and re-dump the bad parts")

    def _check_tokens(self, arrays, k, j, ids, mask) -> None:
        sums = arrays["sums"]
        if sums is not None and (ids.shape != mask.shape or
                                 tokens_checksum(ids, mask) != int(sums[j, 1])):
            raise self._bad(k, j, "input_ids / loss_mask")

    def _check_features(self, arrays, k, j, feats, digest=None) -> None:
        sums = arrays["sums"]
        if sums is None:
            return
        if digest is None:
            digest = xxhash.xxh3_64_intdigest(
                np.ascontiguousarray(feats).reshape(-1).view(np.uint8))
        if digest != int(sums[j, 0]):
            raise self._bad(k, j, "features")

    def __getitem__(self, index) -> dict:
        arrays, lo, hi, k, j = self._locate(index)
        futures = {a: arrays[a][lo:hi].read() for a in ("input_ids", "loss_mask", "features")}
        out = {a: f.result() for a, f in futures.items()}
        self._check_tokens(arrays, k, j, out["input_ids"], out["loss_mask"])
        self._check_features(arrays, k, j, out["features"])
        return out

    def read_tokens(self, index, feature_sums: bool = False) -> dict:
        """Record `index` without its features: dict(input_ids, loss_mask), checksum-checked,
        and with `feature_sums` the features' sums [2] uint32 (for the step to check)."""
        arrays, lo, hi, k, j = self._locate(index)
        futures = {a: arrays[a][lo:hi].read() for a in ("input_ids", "loss_mask")}
        out = {a: f.result() for a, f in futures.items()}
        self._check_tokens(arrays, k, j, out["input_ids"], out["loss_mask"])
        if feature_sums:
            out["feature_sums"] = self._feature_sums_of(arrays, k, j)
        return out

    def read_features_into(self, index, out: np.ndarray, check: bool = True):
        """Start reading record `index`'s features [T, F] straight into `out` (a writable,
        C-contiguous bf16 array, e.g. one row of a batch); returns a future whose `.result()`
        waits and raises CacheError if the bytes do not match the record's checksum. With
        `check=False` the features are not hashed here: the caller checks their feature sums
        on the device (the trainer's step).
        Plain chunk files on a local filesystem (`plain_chunk_files`: what TSPartWriter writes)
        are os.preadv'd into `out`, one copy, hashed block by block as they land; anything else
        is read by TensorStore (its read buffer, then `out`) and hashed after."""
        arrays, lo, hi, k, j = self._locate(index)
        plain = arrays["plain"]
        if plain is not None and out.flags.c_contiguous and out.nbytes == (hi - lo) * plain[2]:
            directory, rows, row_bytes = plain
            c, r = divmod(lo, rows)
            if (hi - 1) // rows == c:  # one chunk holds the sequence (the writer's layout)
                with self._lock:
                    if self._pool is None:
                        self._pool = concurrent.futures.ThreadPoolExecutor(
                            _PREAD_THREADS, thread_name_prefix="ts-pread")
                    pool = self._pool

                def pread():
                    hashed = check and arrays["sums"] is not None
                    digest = _pread_into(directory / "c" / str(c) / "0", out, r * row_bytes,
                                         hashed=hashed)
                    if hashed:
                        self._check_features(arrays, k, j, out, digest)
                return pool.submit(pread)

        future = _ts().array(out, copy=False, write=True).write(arrays["features"][lo:hi])
        if not check:
            return future
        return _Checked(future, lambda: self._check_features(arrays, k, j, out))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def verify(self) -> int:
        kv = open_kvstore(self.root)
        for part in self.parts:
            verify_part(kv, part, self.root)
        return len(self)

    def close(self) -> None:
        with self._lock:
            self._open.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Checked:
    """A TensorStore read future whose `result()` also checks the bytes it delivered."""

    def __init__(self, future, check):
        self._future, self._check = future, check

    def result(self):
        self._future.result()
        self._check()


def verify_part(kv, part: PartInfo, root: str) -> None:
    """Raise CacheError unless the part has its committed size, CRC32 and record count."""
    size, crc = part_checksum(kv, part.file, root)
    where = root + part.file
    if size == 0:
        raise CacheError(f"{where} is missing")
    if size != part.bytes:
        raise CacheError(f"{where} has {size} bytes, the ledger committed {part.bytes} "
                         "(truncated or overwritten)")
    if crc != part.crc32:
        raise CacheError(f"{where} is corrupted: CRC32 {crc:#010x} != committed {part.crc32:#010x}")
    ts = _ts()
    try:
        off = ts.open({"driver": "zarr3", "kvstore": where + "/offsets/"}, open=True).result()
    except (ValueError, RuntimeError) as e:
        raise CacheError(f"{where}: unreadable offsets ({e})") from None
    if off.shape[0] != part.records + 1:
        raise CacheError(f"{where} holds {off.shape[0] - 1} records, expected {part.records}")


class TensorStoreParts:
    """Parts are zarr3 key prefixes under the data root (pipeline/cache/ts_parts.py)."""

    def __init__(self, directory: Path, manifest: CacheManifest):
        self.manifest = manifest
        self.root = root_url(directory, manifest.kvstore)
        self._kv = None

    @property
    def kv(self):
        if self._kv is None:
            self._kv = open_kvstore(self.root)
        return self._kv

    def where(self, name: str) -> str:
        return self.root + name

    def names(self) -> set[str]:
        return part_names(self.kv)

    def delete(self, name: str) -> None:
        delete_part(self.kv, name)

    def open_writer(self, name: str, capacity: int):
        m = self.manifest
        return TSPartWriter(self.root, name, capacity, m.seq_len, m.feature_dim)

    def write(self, writer, record: bytes, feature_sums=None) -> None:
        writer.write(record, self.manifest, feature_sums)

    def close(self, writer, name: str) -> None:
        writer.close()  # the file kvstore fsyncs each value it writes (file_io_sync)

    def checksum(self, name: str) -> tuple[int, int]:
        return part_checksum(self.kv, name, self.root)

    def verify(self, part: PartInfo) -> None:
        verify_part(self.kv, part, self.root)
