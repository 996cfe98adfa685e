"""ArrayRecord parts: reading, verifying and writing them (no easydel/torch: the trainer uses it).

`open_cache(dir)` -> CacheReader: `.manifest`, `len()`, `[i]` -> dict(input_ids, loss_mask,
features) of sequence i, iteration in sequence order, `.paths` / `.grain_paths` (what
`grain.sources.ArrayRecordDataSource` takes; its key i is sequence i too) and `verify()`.
Nothing loads a whole part: records are read one at a time.
"""
from __future__ import annotations

import bisect
import collections
import threading
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from array_record.python.array_record_module import ArrayRecordReader

from array_record.python.array_record_module import ArrayRecordWriter

from pipeline.cache.format import (
    FILE_GLOB, WRITER_OPTIONS, CacheError, CacheManifest, PartInfo, decode_record, file_crc32)
from pipeline.cache.ledger import fsync_file

# readahead 0: random access reads exactly one record (Grain uses the same option).
_RANDOM_OPTIONS = "readahead_buffer_size:0"
_MAX_OPEN_READERS = 16


def _open_reader(path: Path, options: str) -> ArrayRecordReader:
    try:
        reader = ArrayRecordReader(str(path), options)
    except (OSError, RuntimeError, ValueError) as e:
        raise CacheError(f"cannot open {path}: {' '.join(str(e).split())}") from e
    if not reader.ok():
        raise CacheError(f"{path} is not a readable ArrayRecord file (truncated or corrupted)")
    return reader


def _close_quietly(reader: ArrayRecordReader) -> None:
    try:
        reader.close()
    except RuntimeError:  # a corrupted file also fails on close; the caller already raised
        pass


def verify_part(directory: Path, part: PartInfo, record_nbytes: int) -> None:
    """Raise CacheError unless the part has its committed size, CRC32 and record count."""
    path = Path(directory) / part.file
    if not path.exists():
        raise CacheError(f"{path} is missing")
    size = path.stat().st_size
    if size != part.bytes:
        raise CacheError(f"{path} has {size} bytes, the ledger committed {part.bytes} (truncated "
                         "or overwritten)")
    crc = file_crc32(path)
    if crc != part.crc32:
        raise CacheError(f"{path} is corrupted: CRC32 {crc:#010x} != committed {part.crc32:#010x}")
    reader = _open_reader(path, _RANDOM_OPTIONS)
    try:
        if reader.num_records() != part.records:
            raise CacheError(f"{path} holds {reader.num_records()} records, expected {part.records}")
    finally:
        _close_quietly(reader)


class CacheReader:
    """Random access and streaming over the committed records of a cache, in sequence order."""

    def __init__(self, directory: Path, manifest: CacheManifest, parts: Sequence[PartInfo]):
        self.directory = Path(directory)
        self.manifest = manifest
        self.layout = manifest.layout
        # (part, shard) order == sequence order (see cache_format).
        self.parts = tuple(sorted(parts, key=lambda p: (p.part, p.shard)))
        self._starts = [0]
        for p in self.parts:
            self._starts.append(self._starts[-1] + p.records)
        self._readers: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def paths(self) -> list[str]:
        """The part files in sequence order."""
        return [str(self.directory / p.file) for p in self.parts]

    @property
    def grain_paths(self) -> list[str]:
        """`path[0:n]` strings: ArrayRecordDataSource then opens no file to count records."""
        return [f"{self.directory / p.file}[0:{p.records}]" for p in self.parts]

    def locate(self, index: int) -> tuple[int, int]:
        """Sequence index -> (part number k in `parts`, record within the part)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for a cache of {len(self)}")
        index %= len(self)
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def read_error(self, index: int, error: BaseException) -> CacheError:
        """The one-line error for a record whose read failed (Riegeli checks the hash of the
        chunk holding each record, so a changed byte fails the read) or has the wrong size."""
        k, j = self.locate(index)
        why = " ".join(str(error).split())
        if len(why) > 200:
            why = why[:200] + "..."
        return CacheError(
            f"{self.directory / self.parts[k].file} record {j} (cache record {index % len(self)})"
            f" is corrupted ({why}); nothing was trained on it. Check the whole cache with "
            f"`python -m pipeline.cache.verify {self.directory}` and re-dump the bad parts")

    def read_bytes(self, index: int) -> bytes:
        k, j = self.locate(index)
        try:
            buf = self._reader(k).read([j])[0]
        except (RuntimeError, ValueError, OSError) as e:
            raise self.read_error(index, e) from None
        if len(buf) != self.manifest.record_nbytes:
            raise self.read_error(index, ValueError(f"{len(buf)} bytes, expected "
                                                    f"{self.manifest.record_nbytes}"))
        return buf

    def __getitem__(self, index: int) -> dict:
        return decode_record(self.read_bytes(int(index)), self.manifest)

    def __iter__(self) -> Iterator[dict]:
        for k, part in enumerate(self.parts):
            reader = _open_reader(self.directory / part.file, _RANDOM_OPTIONS)
            try:
                for j in range(part.records):
                    try:
                        rec = decode_record(reader.read(), self.manifest)
                    except (RuntimeError, ValueError, OSError) as e:
                        raise self.read_error(self._starts[k] + j, e) from None
                    yield rec
            finally:
                _close_quietly(reader)

    def verify(self) -> int:
        """Check every part's size, record count and CRC32; returns the records checked."""
        for part in self.parts:
            verify_part(self.directory, part, self.manifest.record_nbytes)
        return len(self)

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _reader(self, k: int) -> ArrayRecordReader:
        # Bounded LRU of open files: caches may hold thousands of parts.
        with self._lock:
            if k in self._readers:
                self._readers.move_to_end(k)
                return self._readers[k]
            reader = _open_reader(self.directory / self.parts[k].file, _RANDOM_OPTIONS)
            self._readers[k] = reader
            while len(self._readers) > _MAX_OPEN_READERS:
                self._readers.popitem(last=False)[1].close()
            return reader


class ArrayRecordParts:
    """Parts are `shard-...part-....arrayrecord` files in the cache directory."""

    def __init__(self, directory: Path, manifest: CacheManifest):
        self.directory, self.manifest = Path(directory), manifest

    def where(self, name: str) -> str:
        return str(self.directory / name)

    def names(self) -> set[str]:
        return {p.name for p in self.directory.glob(FILE_GLOB)}

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def open_writer(self, name: str, capacity: int):
        return ArrayRecordWriter(str(self.directory / name), WRITER_OPTIONS)

    def write(self, writer, record: bytes, feature_sums=None) -> None:  # sums: TensorStore only
        writer.write(record)

    def close(self, writer, name: str) -> None:
        writer.close()
        fsync_file(self.directory / name)

    def checksum(self, name: str) -> tuple[int, int]:
        """(bytes, CRC32) of a closed part: every byte of the file, padding too."""
        path = self.directory / name
        return path.stat().st_size, file_crc32(path)

    def verify(self, part: PartInfo) -> None:
        verify_part(self.directory, part, self.manifest.record_nbytes)
