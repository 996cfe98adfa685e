"""The feature cache's public API (no easydel/torch import: the trainer uses it).

    from pipeline.cache import open_cache, decode_record
    cache = open_cache("/dev/shm/dflash")       # refuses an unfinished dump
    cache.manifest.seq_len, cache.manifest.feature_dim, cache.manifest.layer_ids
    len(cache); cache[i]["features"]             # [T, K*H] bfloat16, sequence i
    grain.sources.ArrayRecordDataSource(cache.grain_paths)[i]  # same bytes as cache.read_bytes(i)
    cache.verify()                               # sizes, record counts, CRC32 of every part

Modules, bottom up (each imports only those above it):
  format.py      manifest, record layout, CacheError, load_manifest, settings_key, CRC32
  ledger.py      the atomically replaced ledger of committed parts
  arrayrecord.py ArrayRecord parts: reader (CacheReader), verification, part store
  feature_sums.py per-record feature sums, computed and checked on the device (numpy twin)
  plain_chunks.py plain zarr3 chunk files read without TensorStore (preadv into a batch row)
  ts_parts.py    TensorStore zarr3 parts: writer, reader (TSCacheReader), checksums, part store
  parts.py       the one place the format is chosen: part_store(), parts_reader()
  hosts.py       multi-process caches: host sub-caches behind one manifest (HostsReader)
  reader.py      open_cache(): any format, any host layout
  writer.py      CacheWriter: parts written and committed by ledger
  prepare.py     start, resume or recognise a finished cache before the dump writes
  verify.py      `python -m pipeline.cache.verify DIR`: check every part of a cache
"""
from pipeline.cache.format import (
    BF16, LEDGER_NAME, MANIFEST_NAME, SCHEMA, CacheManifest, Layout, PartInfo, decode_record,
    encode_record, part_filename, record_nbytes)
from pipeline.cache.format import CacheError, load_manifest, settings_key
from pipeline.cache.arrayrecord import CacheReader, verify_part
from pipeline.cache.hosts import HostsReader, HostView
from pipeline.cache.ledger import Ledger
from pipeline.cache.prepare import Prepared, prepare_cache, remove_cache_files
from pipeline.cache.reader import open_cache
from pipeline.cache.ts_parts import TSCacheReader
from pipeline.cache.writer import KILL_ENV, CacheWriteError, CacheWriter

__all__ = [
    "BF16", "LEDGER_NAME", "MANIFEST_NAME", "SCHEMA", "CacheManifest", "Layout", "PartInfo",
    "decode_record", "encode_record", "part_filename", "record_nbytes", "Prepared",
    "prepare_cache", "remove_cache_files", "settings_key", "CacheError", "CacheReader",
    "load_manifest", "open_cache", "verify_part", "KILL_ENV", "CacheWriteError", "CacheWriter",
    "Ledger", "HostsReader", "HostView", "TSCacheReader",
]
