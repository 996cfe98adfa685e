"""The feature cache's public API (no easydel/torch import: the trainer uses it).

    from pipeline.cache import open_cache, decode_record
    cache = open_cache("/dev/shm/dflash")       # refuses an unfinished dump
    cache.manifest.seq_len, cache.manifest.feature_dim, cache.manifest.layer_ids
    len(cache); cache[i]["features"]             # [T, K*H] bfloat16, sequence i
    grain.sources.ArrayRecordDataSource(cache.grain_paths)[i]  # same bytes as cache.read_bytes(i)
    cache.verify()                               # sizes, record counts, CRC32 of every part

Formats: ArrayRecord files (default) or TensorStore zarr3 parts (`--format tensorstore`,
pipeline/cache_ts.py), behind the same reader interface; a multi-process dump is one cache of
host sub-caches (pipeline/cache_hosts.py, `HostsReader.process_view(p, P)` = host p's rows).

Format and layout: pipeline/cache_format.py. Writing and resuming: pipeline/cache_writer.py,
pipeline/cache_prepare.py, pipeline/ledger.py.
"""
from pipeline.cache_format import (
    BF16, LEDGER_NAME, MANIFEST_NAME, SCHEMA, CacheManifest, Layout, PartInfo, decode_record,
    encode_record, part_filename, record_nbytes)
from pipeline.cache_prepare import Prepared, prepare_cache, remove_cache_files, settings_key
from pipeline.cache_reader import CacheError, CacheReader, load_manifest, open_cache, verify_part
from pipeline.cache_hosts import HostsReader, HostView
from pipeline.cache_ts import TSCacheReader
from pipeline.cache_writer import KILL_ENV, CacheWriteError, CacheWriter
from pipeline.ledger import Ledger

__all__ = [
    "BF16", "LEDGER_NAME", "MANIFEST_NAME", "SCHEMA", "CacheManifest", "Layout", "PartInfo",
    "decode_record", "encode_record", "part_filename", "record_nbytes", "Prepared",
    "prepare_cache", "remove_cache_files", "settings_key", "CacheError", "CacheReader",
    "load_manifest", "open_cache", "verify_part", "KILL_ENV", "CacheWriteError", "CacheWriter",
    "Ledger", "HostsReader", "HostView", "TSCacheReader",
]
