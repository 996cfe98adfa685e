"""The one place a cache's `--format` is chosen: the part store (what the writer, resume and
verification do to a part: open for writing, close and checksum, list, delete, verify) and the
reader of committed parts. ArrayRecord files: pipeline/cache/arrayrecord.py; TensorStore zarr3
parts: pipeline/cache/ts_parts.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.cache.arrayrecord import ArrayRecordParts, CacheReader
from pipeline.cache.format import CacheManifest, PartInfo
from pipeline.cache.ts_parts import TensorStoreParts, TSCacheReader


def part_store(directory, manifest: CacheManifest):
    if manifest.format == "tensorstore":
        return TensorStoreParts(Path(directory), manifest)
    return ArrayRecordParts(Path(directory), manifest)


def parts_reader(directory, manifest: CacheManifest, parts: Sequence[PartInfo]):
    """Reader over the given committed parts of a one-host cache, in sequence order."""
    if manifest.format == "tensorstore":
        return TSCacheReader(Path(directory), manifest, parts)
    return CacheReader(Path(directory), manifest, parts)
