"""The feature cache's on-disk format: manifest, record layout and the sequence -> file map.

No easydel/torch import: the trainer reads caches through this module.

Layout. Sequences are numbered 0, 1, 2, ... in dump order. Every `commit_every` (C) sequences
form one commit interval p; interval p is split into `per_part = ceil(C / shards)` consecutive
sequences per shard, each run stored in its own ArrayRecord file
`shard-SSSSS-of-NNNNN.part-PPPPP.arrayrecord`. ArrayRecord files cannot be reopened for appending
(the index is written on close), so a part is closed before the ledger that commits it is
written; resuming after a crash deletes uncommitted parts and redoes at most one interval.
Because the map is a pure function of the sequence index, the files are the same whatever
interruptions happened, and reading the parts in (part, shard) order yields the sequences in
dump order: record key i of the cache, of `open_cache(...)[i]` and of a Grain
`ArrayRecordDataSource(reader.paths)` is sequence i.

Record (uncompressed, group_size 1 so Grain can read any record alone):
`input_ids` int32 LE [T] | `loss_mask` uint8 [T] | `features` bfloat16 [T, F], F = K * H.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pipeline.errors import UserError

SCHEMA = "dflash-feature-cache/1"
MANIFEST_NAME = "manifest.json"
LEDGER_NAME = "ledger.json"
FILE_GLOB = "shard-*-of-*.part-*.arrayrecord"
# group_size:1 -> one record per chunk, so random access decodes one record (Grain needs it).
# Uncompressed: bf16 activations barely compress and zstd would cost the writer thread CPU.
WRITER_OPTIONS = "group_size:1,uncompressed"
BF16 = np.dtype(ml_dtypes.bfloat16)


FORMATS = ("arrayrecord", "tensorstore")
# What a dump writes without --format (a resumed dump keeps its cache's format instead: see
# pipeline/cache/prepare.py `existing_format`). TensorStore's plain chunks are read straight into
# the batch (one copy, ~0.4 CPU s/GB): about raw read speed, where ArrayRecord's copies and
# per-record buffers reach ~0.1-0.3x of it (docs/BENCHMARKS.md section 2). Both stay readable;
# a manifest without a "format" key is an ArrayRecord cache (CacheManifest's default).
DEFAULT_FORMAT = "tensorstore"


def part_filename(shard: int, part: int, shards: int, fmt: str = "arrayrecord") -> str:
    """An ArrayRecord file name, or a TensorStore part's key prefix (pipeline/cache/ts_parts.py)."""
    suffix = ".ts" if fmt == "tensorstore" else ".arrayrecord"
    return f"shard-{shard:05d}-of-{shards:05d}.part-{part:05d}{suffix}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each sequence lives: a pure function of its index (see module docstring)."""

    shards: int
    commit_every: int

    def __post_init__(self):
        if self.shards < 1 or self.commit_every < 1:
            raise ValueError(f"shards and commit_every must be >= 1, got {self}")

    @property
    def per_part(self) -> int:
        """Sequences per (shard, interval) part; the last shards of an interval may get fewer."""
        return math.ceil(self.commit_every / self.shards)

    def locate(self, index: int) -> tuple[int, int, int]:
        """Sequence index -> (shard, part, position within the part file)."""
        part, j = divmod(index, self.commit_every)
        shard, pos = divmod(j, self.per_part)
        return shard, part, pos

    def is_commit_point(self, count: int) -> bool:
        """True when `count` sequences end an interval (the ledger is committed there)."""
        return count > 0 and count % self.commit_every == 0


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """One closed, fsynced part file: its record count, file size and the CRC32 of its bytes."""

    shard: int
    part: int
    file: str
    records: int
    bytes: int
    crc32: int

    def to_list(self) -> list:
        return [self.shard, self.part, self.file, self.records, self.bytes, self.crc32]

    @classmethod
    def from_list(cls, row: list) -> "PartInfo":
        shard, part, file, records, nbytes, crc = row
        return cls(int(shard), int(part), check_part_name(file), int(records), int(nbytes),
                   int(crc))


# What `part_filename` writes. A part name is read from a manifest or ledger and joined to the
# cache directory (or kvstore root): anything else (`../../elsewhere`, an absolute path, a
# subdirectory) would make the reader open files outside the cache, so it is refused.
_PART_NAME = re.compile(r"shard-\d{5,}-of-\d{5,}\.part-\d{5,}\.(arrayrecord|ts)")


def check_part_name(name) -> str:
    """`name` if it is a part name as the dump writes it, else ValueError (-> one line)."""
    if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
        raise ValueError(f"part name {name!r} is not a part of this cache (expected "
                         "shard-SSSSS-of-NNNNN.part-PPPPP.arrayrecord or .ts, inside the cache)")
    return name


@dataclasses.dataclass(frozen=True)
class CacheManifest:
    """Everything a reader needs to interpret a cache, and the settings resume must match.

    `settings` is the dump's identity (teacher, data, layer ids, lengths, layout...): a rerun
    whose settings differ is refused. `parts`/`complete` are filled when the dump finishes.
    """

    seq_len: int  # T: tokens per record
    hidden_size: int  # H of the teacher
    layer_ids: tuple[int, ...]  # the K teacher layers, in feature order
    shards: int
    commit_every: int
    teacher: dict  # {"path", "config_sha256", "weights_sha256", ...}
    tokenizer: str | None = None  # tokenizer path or name the input_ids come from
    mask_token_id: int | None = None
    vocab_size: int | None = None
    dtype: str = "bfloat16"  # storage dtype of features
    settings: dict = dataclasses.field(default_factory=dict)
    format: str = "arrayrecord"  # part storage: "arrayrecord" files or "tensorstore" zarr3 parts
    kvstore: str | None = None  # TensorStore data root (URL); None = the cache directory
    hosts: int = 1  # > 1: a multi-process cache of `hosts` host sub-caches (pipeline/cache/hosts.py)
    complete: bool = False
    num_records: int = 0
    parts: tuple[PartInfo, ...] = ()
    schema: str = SCHEMA

    @property
    def num_features(self) -> int:
        """K: number of teacher layers concatenated in each token's feature vector."""
        return len(self.layer_ids)

    @property
    def feature_dim(self) -> int:
        """F = K * H."""
        return self.num_features * self.hidden_size

    @property
    def record_nbytes(self) -> int:
        return record_nbytes(self.seq_len, self.feature_dim)

    @property
    def layout(self) -> Layout:
        return Layout(self.shards, self.commit_every)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_ids"] = list(self.layer_ids)
        d["parts"] = [p.to_list() for p in self.parts]
        d["num_features"] = self.num_features  # derived, written for humans and other tools
        d["feature_dim"] = self.feature_dim
        d["shard_summary"] = shard_summary(self.parts, self.shards)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CacheManifest":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unknown cache schema {d.get('schema')!r} (expected {SCHEMA!r})")
        if d.get("format", "arrayrecord") not in FORMATS:
            raise ValueError(f"unknown cache format {d.get('format')!r} (expected one of {FORMATS})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["layer_ids"] = tuple(int(i) for i in d["layer_ids"])
        kw["parts"] = tuple(PartInfo.from_list(r) for r in d.get("parts", ()))
        return cls(**kw)

    def with_parts(self, parts, complete: bool) -> "CacheManifest":
        parts = tuple(parts)
        return dataclasses.replace(
            self, parts=parts, complete=complete, num_records=sum(p.records for p in parts))


def shard_summary(parts, shards: int) -> list[dict[str, Any]]:
    """Per-shard record count, byte size and part checksums (for the manifest's readers)."""
    out = [{"shard": s, "records": 0, "bytes": 0, "crc32": []} for s in range(shards)]
    for p in parts:
        out[p.shard]["records"] += p.records
        out[p.shard]["bytes"] += p.bytes
        out[p.shard]["crc32"].append(p.crc32)
    return out


def record_nbytes(seq_len: int, feature_dim: int) -> int:
    return seq_len * (4 + 1 + 2 * feature_dim)


def encode_record(input_ids: np.ndarray, loss_mask: np.ndarray, features: np.ndarray) -> bytes:
    """[T] ids, [T] mask, [T, F] features -> record bytes (the layout in the module docstring)."""
    t = input_ids.shape[0]
    if loss_mask.shape != (t,) or features.ndim != 2 or features.shape[0] != t:
        raise ValueError(
            f"bad record shapes: ids {input_ids.shape}, mask {loss_mask.shape}, "
            f"features {features.shape}")
    return b"".join((
        np.ascontiguousarray(input_ids, dtype="<i4").tobytes(),
        np.ascontiguousarray(loss_mask, dtype=np.uint8).tobytes(),
        np.ascontiguousarray(features, dtype=BF16).tobytes(),
    ))


def decode_record(buf: bytes, manifest: CacheManifest) -> dict[str, np.ndarray]:
    """Record bytes -> dict(input_ids [T] int32, loss_mask [T] uint8, features [T, F] bf16).

    Zero-copy read-only views into `buf`.
    """
    t, f = manifest.seq_len, manifest.feature_dim
    if len(buf) != record_nbytes(t, f):
        raise ValueError(
            f"record has {len(buf)} bytes, expected {record_nbytes(t, f)} for T={t}, F={f}")
    return {
        "input_ids": np.frombuffer(buf, dtype="<i4", count=t, offset=0),
        "loss_mask": np.frombuffer(buf, dtype=np.uint8, count=t, offset=4 * t),
        "features": np.frombuffer(buf, dtype=BF16, count=t * f, offset=5 * t).reshape(t, f),
    }


def read_json(path: Path) -> dict:
    with open(path, "rb") as fh:
        return json.loads(fh.read())


class CacheError(UserError):
    """A cache is missing, incomplete or corrupted."""


def load_manifest(directory: Path) -> CacheManifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise CacheError(f"no feature cache at {directory} ({MANIFEST_NAME} not found)")
    try:
        return CacheManifest.from_json(read_json(path))
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{path} is not a valid cache manifest: {e}") from e


def file_crc32(path: Path, block: int = 1 << 22) -> int:
    """CRC32 of a file's bytes, streamed (ArrayRecord files have unhashed padding and headers,
    so the reader's own chunk hashes miss some flips; a whole-file CRC misses none)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


# Manifest keys that change while a dump runs; every other key must match to resume.
_PROGRESS_KEYS = {"complete", "num_records", "parts", "shard_summary"}


def settings_key(manifest: CacheManifest) -> str:
    identity = {k: v for k, v in manifest.to_json().items() if k not in _PROGRESS_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
