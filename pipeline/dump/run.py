"""The teacher dump: run the teacher over the data once and stream its features into a cache.

`run_dump(DumpConfig(...))` is what `python -m pipeline.teacher_dump` calls. The device loop
pads every batch to [batch_size, seq_len] (one compiled program) and hands the still-running
device array to a writer thread through a bounded queue; the writer waits for it, serialises
the rows and appends them to the cache (pipeline/cache/writer.py), so the accelerator computes
batch n+1 while batch n is written, and at most `queue_batches` + 2 batches are in flight.
A rerun resumes from the ledger (pipeline/cache/prepare.py). The teacher and the sequences can
be injected (tests use a cheap stand-in); by default they come from `--model` and `--data`.
Parts are TensorStore zarr3 parts (the default) or ArrayRecord files (`--format`,
pipeline/cache/parts.py); under jax.distributed every process dumps its own rows into its own
host sub-cache (pipeline/dump/hosts.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.cache.format import BF16, DEFAULT_FORMAT, FORMATS, CacheManifest
from pipeline.cache.prepare import existing_format
from pipeline.dump import plan as dump_plan
from pipeline.dump.sources import (TeacherInfo, check_attention_length, default_sequences,
                                   load_teacher, teacher_attention, teacher_info)
from pipeline.distributed import process_group
from pipeline.dump.hosts import run_host_dump
from pipeline.dump.local import _batches, dump_into  # noqa: F401  (_batches: tools.bench_dump)
from pipeline.errors import UserError
from pipeline.teacher.attention import ATTENTIONS


@dataclasses.dataclass(frozen=True)
class DumpConfig:
    """Settings of one dump. What shapes the records (the teacher's snapshot hashes, the data's
    fingerprint, layer ids, seq_len, shards, commit interval, batch size, compute dtype and
    max_seqs) is the cache's identity: a rerun with any of them changed is refused."""

    model: str = "openai/gpt-oss-20b"  # HF snapshot dir, repo id in the local HF cache, or "tiny"
    data: str | None = None  # file/dir/glob of text, jsonl, parquet...; None = built-in corpus
    out: str = "/dev/shm/dflash/"
    shards: int = 64  # the cache's records are spread over this many shards
    seq_len: int = 3072  # tokens per record (T)
    batch_size: int = 8  # sequences per teacher call
    layer_ids: tuple[int, ...] | None = None  # teacher layers; None = build_target_layer_ids(L, K)
    num_layers: int = 5  # K when layer_ids is None
    sharding_axis_dims: tuple[int, ...] | None = None  # EasyDeL mesh; None = sized to devices
    # (pipeline.teacher.sharding.default_axis_dims: fsdp over every chip, experts sharded)
    # teacher attention (pipeline.teacher.attention): auto = blocksparse on TPU (T padded to a
    # multiple of its block), vanilla on CPU; the one that runs is recorded in the manifest
    attention: str = "auto"
    max_seqs: int | None = None  # stop after this many sequences (trials)
    overwrite: bool = False  # delete an existing cache in `out` first
    dtype: str = "bfloat16"  # teacher compute dtype; features are stored as bfloat16
    commit_every: int = 256  # ledger granularity in sequences (rounded up to batch_size)
    block_size: int = 8  # draft block size: sequences must be longer than one block
    queue_batches: int = 4  # batches in flight between the device loop and the writer
    progress: bool = True  # tqdm bar on stderr
    # part storage, "arrayrecord" or "tensorstore" (zarr3); None: the format of the cache being
    # resumed in `out`, else DEFAULT_FORMAT (tensorstore), see `resolve_format`
    format: str | None = None
    kvstore: str | None = None  # tensorstore data root URL (e.g. gs://b/cache/); None = --out
    # jax.distributed (pipeline/dump/hosts.py): each process dumps sequences i % count == index
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False  # jax.distributed.initialize() from the cluster (TPU pod) environment
    plan: bool = False  # only report the cache's size and whether it fits (pipeline/dump/plan.py)

    def validate(self) -> None:
        for name in ("shards", "seq_len", "batch_size", "num_layers", "commit_every",
                     "block_size", "queue_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_seqs is not None and self.max_seqs < 1:
            raise UserError(f"--max-seqs must be >= 1, got {self.max_seqs}")
        if self.seq_len <= self.block_size:
            raise UserError(f"--seq-len {self.seq_len} is not longer than one draft block "
                            f"(--block-size {self.block_size}): no anchor would fit")
        if self.format not in (None, *FORMATS):
            raise UserError(f"--format must be arrayrecord or tensorstore, got {self.format!r}")
        if self.kvstore and self.format not in (None, "tensorstore"):
            raise UserError("--kvstore needs --format tensorstore")
        if self.attention not in ATTENTIONS:
            raise UserError(f"--attention must be one of {', '.join(ATTENTIONS)}, "
                            f"got {self.attention!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise UserError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")

    @property
    def interval(self) -> int:
        """Commit interval: a multiple of batch_size, so every run pads the same batches."""
        return math.ceil(self.commit_every / self.batch_size) * self.batch_size


def select_layers(config: DumpConfig, num_layers: int) -> tuple[int, ...]:
    if config.layer_ids is None:
        from model import build_target_layer_ids  # pure python/JAX; the draft's definition
        if config.num_layers > num_layers:
            raise UserError(f"--num-layers {config.num_layers} exceeds the teacher's "
                            f"{num_layers} layers")
        return tuple(int(i) for i in build_target_layer_ids(num_layers, config.num_layers))
    ids = tuple(config.layer_ids)
    if not ids:
        raise UserError("--layer-ids names no layer")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"unknown layer id(s) {bad}: the teacher has {num_layers} layers "
                        f"(valid ids 0..{num_layers - 1})")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"--layer-ids repeats layer(s) {dup}: each layer's features would be "
                        "stored twice; name each layer once")
    return ids


def resolve_format(config: DumpConfig) -> str:
    """--format when given; else tensorstore for a --kvstore; else the format of the cache
    already in --out (unless --overwrite), so a dump begun before the default changed resumes
    as it began; else DEFAULT_FORMAT."""
    if config.format is not None:
        return config.format
    if config.kvstore:
        return "tensorstore"
    found = None if config.overwrite else existing_format(config.out)
    return found or DEFAULT_FORMAT


def build_manifest(config: DumpConfig, info: TeacherInfo) -> CacheManifest:
    layer_ids = select_layers(config, info.num_layers)
    settings = {
        "data": info.data_identity, "batch_size": config.batch_size, "max_seqs": config.max_seqs,
        "compute_dtype": config.dtype, "num_teacher_layers": info.num_layers,
    }
    return CacheManifest(
        seq_len=config.seq_len, hidden_size=info.hidden_size, layer_ids=layer_ids,
        shards=config.shards, commit_every=config.interval, teacher=info.identity,
        tokenizer=info.tokenizer, mask_token_id=info.mask_token_id, vocab_size=info.vocab_size,
        settings=settings, format=resolve_format(config), kvstore=config.kvstore)


def _complete(config: DumpConfig) -> bool:
    """A finished cache in --out (a rerun only verifies it: nothing to size)."""
    import json

    path = Path(config.out) / "manifest.json"
    try:
        return not config.overwrite and bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def run_dump(config: DumpConfig, *, teacher=None, sequences: Iterable | None = None,
             log=print) -> dict:
    """Dump (or resume, or recognise as complete) the cache in `config.out`; returns the summary
    {sequences, tokens, bytes, seconds, tokens_per_s, ...} of this run's work."""
    config.validate()
    t0 = time.perf_counter()
    info = teacher_info(config, teacher)
    manifest = build_manifest(config, info)
    if config.plan:  # counts the sequences; loads no teacher, writes nothing
        p = dump_plan.plan(config, manifest, sequences if sequences is not None
                           else default_sequences(config, info))
        log(dump_plan.describe(p))
        return p
    # Peek before touching the disk: empty data must not leave a half-made cache behind.
    seqs = iter(sequences if sequences is not None else default_sequences(config, info))
    first = next(seqs, None)
    if first is None:
        raise UserError(f"no sequences of {config.seq_len} tokens in the data "
                        f"({info.data_identity.get('source')})")
    seqs = itertools.chain([first], seqs)
    group = process_group(config)
    # After process_group: resolving "auto" may start the backend (jax.distributed first).
    attention = teacher_attention(config, teacher)
    check_attention_length(config, attention, info)
    config = dataclasses.replace(config, attention=attention)
    manifest = dataclasses.replace(manifest, settings={**manifest.settings, "attention": attention})
    if group.count == 1 and sequences is None and not _complete(config):
        # a cache that cannot fit is refused before anything is written
        dump_plan.check_fits(config, manifest, lambda: default_sequences(config, info))
    if group.count > 1:
        return run_host_dump(config, manifest, seqs, teacher, info, group, log, t0)
    return dump_into(config, config.out, manifest, seqs, config.max_seqs, teacher, info, log, t0)


