"""Open a feature cache, whatever its format and host layout (no easydel/torch: the trainer
uses it).

`open_cache(dir)` -> a reader with `.manifest`, `len()`, `[i]` -> dict(input_ids, loss_mask,
features) of sequence i, iteration in sequence order and `verify()`: CacheReader (ArrayRecord,
with `.paths` / `.grain_paths` for `grain.sources.ArrayRecordDataSource`), TSCacheReader
(TensorStore) or HostsReader (a multi-process dump). Nothing loads a whole part.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.cache.arrayrecord import CacheReader, verify_part
from pipeline.cache.format import CacheError, load_manifest
from pipeline.cache.hosts import HostsReader
from pipeline.cache.ledger import committed_parts
from pipeline.cache.parts import parts_reader

__all__ = ["CacheError", "CacheReader", "load_manifest", "open_cache", "verify_part"]


def open_cache(directory, *, verify: bool = False, allow_incomplete: bool = False):
    """Open the cache in `directory` -> CacheReader (ArrayRecord), TSCacheReader (TensorStore) or
    HostsReader (multi-process dump), all with `manifest`, `len`, `[i]`, iteration, `verify()`.
    An unfinished dump is refused unless allow_incomplete, which then exposes the records its
    ledger committed."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    parts = committed_parts(directory, manifest, allow_incomplete)
    if manifest.hosts > 1:  # a multi-process dump: one sub-cache per host
        reader = HostsReader(directory, manifest)
    else:
        reader = parts_reader(directory, manifest, parts)
    if verify:
        reader.verify()
    return reader
