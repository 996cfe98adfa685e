"""Part storage of a cache, one class per `--format`: what the writer, resume and verification do
to a part (open for writing, close and checksum, list, delete, verify), so those protocols are
written once (cache_writer.py, cache_prepare.py) for ArrayRecord files and TensorStore parts.
"""
from __future__ import annotations

from pathlib import Path

from array_record.python.array_record_module import ArrayRecordWriter

from pipeline.cache_format import FILE_GLOB, WRITER_OPTIONS, CacheManifest, PartInfo
from pipeline.ledger import fsync_file


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

    def write(self, writer, record: bytes) -> None:
        writer.write(record)

    def close(self, writer, name: str) -> None:
        writer.close()
        fsync_file(self.directory / name)

    def checksum(self, name: str) -> tuple[int, int]:
        """(bytes, CRC32) of a closed part: every byte of the file, padding too."""
        from pipeline.cache_reader import file_crc32
        path = self.directory / name
        return path.stat().st_size, file_crc32(path)

    def verify(self, part: PartInfo) -> None:
        from pipeline.cache_reader import verify_part
        verify_part(self.directory, part, self.manifest.record_nbytes)


class TensorStoreParts:
    """Parts are zarr3 key prefixes under the data root (pipeline/cache_ts.py)."""

    def __init__(self, directory: Path, manifest: CacheManifest):
        from pipeline import cache_ts
        self._ts, self.manifest = cache_ts, manifest
        self.root = cache_ts.root_url(directory, manifest.kvstore)
        self._kv = None

    @property
    def kv(self):
        if self._kv is None:
            self._kv = self._ts.open_kvstore(self.root)
        return self._kv

    def where(self, name: str) -> str:
        return self.root + name

    def names(self) -> set[str]:
        return self._ts.part_names(self.kv)

    def delete(self, name: str) -> None:
        self._ts.delete_part(self.kv, name)

    def open_writer(self, name: str, capacity: int):
        m = self.manifest
        return self._ts.TSPartWriter(self.root, name, capacity, m.seq_len, m.feature_dim)

    def write(self, writer, record: bytes) -> None:
        writer.write(record, self.manifest)

    def close(self, writer, name: str) -> None:
        writer.close()  # the file kvstore fsyncs each value it writes (file_io_sync)

    def checksum(self, name: str) -> tuple[int, int]:
        return self._ts.part_checksum(self.kv, name)

    def verify(self, part: PartInfo) -> None:
        self._ts.verify_part(self.kv, part, self.root)


def part_store(directory, manifest: CacheManifest):
    if manifest.format == "tensorstore":
        return TensorStoreParts(Path(directory), manifest)
    return ArrayRecordParts(Path(directory), manifest)
