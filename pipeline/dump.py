"""The teacher dump: run the teacher over the data once and stream its features into a cache.

`run_dump(DumpConfig(...))` is what `python -m pipeline.teacher_dump` calls. The device loop
pads every batch to [batch_size, seq_len] (one compiled program) and hands the still-running
device array to a writer thread through a bounded queue; the writer waits for it, serialises
the rows and appends them to the cache (pipeline/cache_writer.py), so the accelerator computes
batch n+1 while batch n is written, and at most `queue_batches` + 2 batches are in flight.
A rerun resumes from the ledger (pipeline/cache_prepare.py). The teacher and the sequences can
be injected (tests use a cheap stand-in); by default they come from `--model` and `--data`.
Parts are ArrayRecord files or TensorStore zarr3 parts (`--format`, pipeline/cache_parts.py);
under jax.distributed every process dumps its own rows into its own host sub-cache
(pipeline/dump_hosts.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.cache_format import BF16, CacheManifest
from pipeline.cache_prepare import lock_cache, prepare_cache
from pipeline.cache_verify import check_complete
from pipeline.dump_sources import TeacherInfo, default_sequences, load_teacher, teacher_info
from pipeline.dump_writer import WriterThread
from pipeline.errors import UserError


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
    max_seqs: int | None = None  # stop after this many sequences (trials)
    overwrite: bool = False  # delete an existing cache in `out` first
    dtype: str = "bfloat16"  # teacher compute dtype; features are stored as bfloat16
    commit_every: int = 256  # ledger granularity in sequences (rounded up to batch_size)
    block_size: int = 8  # draft block size: sequences must be longer than one block
    queue_batches: int = 4  # batches in flight between the device loop and the writer
    progress: bool = True  # tqdm bar on stderr
    format: str = "arrayrecord"  # part storage: "arrayrecord" or "tensorstore" (zarr3)
    kvstore: str | None = None  # tensorstore data root URL (e.g. gs://b/cache/); None = --out
    # jax.distributed (pipeline/dump_hosts.py): each process dumps sequences i % count == index
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False  # jax.distributed.initialize() from the cluster (TPU pod) environment

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
        if self.format not in ("arrayrecord", "tensorstore"):
            raise UserError(f"--format must be arrayrecord or tensorstore, got {self.format!r}")
        if self.kvstore and self.format != "tensorstore":
            raise UserError("--kvstore needs --format tensorstore")
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
        settings=settings, format=config.format, kvstore=config.kvstore)


def _batches(seqs: Iterable, batch_size: int, seq_len: int, start: int) -> Iterator:
    """Yield (first index, ids [b, T] int32, mask [b, T] uint8, valid rows), padded to b rows."""
    it = iter(seqs)
    index = start
    while True:
        rows = list(itertools.islice(it, batch_size))
        if not rows:
            return
        ids = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), np.uint8)
        for r, (tok, lm) in enumerate(rows):
            if len(tok) != seq_len or len(lm) != seq_len:
                raise UserError(f"sequence {index + r} has {len(tok)} tokens, expected --seq-len "
                                f"{seq_len} (the data loader must pack to a fixed length)")
            ids[r], mask[r] = tok, lm
        yield index, ids, mask, len(rows)
        index += len(rows)


def run_dump(config: DumpConfig, *, teacher=None, sequences: Iterable | None = None,
             log=print) -> dict:
    """Dump (or resume, or recognise as complete) the cache in `config.out`; returns the summary
    {sequences, tokens, bytes, seconds, tokens_per_s, ...} of this run's work."""
    config.validate()
    t0 = time.perf_counter()
    info = teacher_info(config, teacher)
    manifest = build_manifest(config, info)
    # Peek before touching the disk: empty data must not leave a half-made cache behind.
    seqs = iter(sequences if sequences is not None else default_sequences(config, info))
    first = next(seqs, None)
    if first is None:
        raise UserError(f"no sequences of {config.seq_len} tokens in the data "
                        f"({info.data_identity.get('source')})")
    seqs = itertools.chain([first], seqs)
    from pipeline.dump_hosts import process_group, run_host_dump
    group = process_group(config)
    if group.count > 1:
        return run_host_dump(config, manifest, seqs, teacher, info, group, log, t0)
    return dump_into(config, config.out, manifest, seqs, config.max_seqs, teacher, info, log, t0)


def dump_into(config: DumpConfig, directory, manifest: CacheManifest, seqs, limit, teacher, info,
              log, t0: float) -> dict:
    """Dump `seqs` (the writer's sequence 0, 1, ...; at most `limit`) into the cache in
    `directory`, resuming it or recognising it as complete."""
    with lock_cache(directory):
        prepared = prepare_cache(directory, manifest, overwrite=config.overwrite)
        out = str(Path(directory).resolve())
        if prepared.complete:
            check_complete(directory)  # a corrupt finished cache is refused, never "complete"
            log(f"cache at {out} is already complete ({prepared.manifest.num_records} sequences); "
                "nothing to do")
            return _summary(0, config.seq_len, 0, t0, t0, out, prepared.manifest.num_records)
        start = prepared.resumed_from
        if start:
            log(f"resuming the dump in {out} after {start} committed sequences")
        if teacher is None:
            teacher = load_teacher(config, info)
        t1 = time.perf_counter()  # teacher loaded: the dump loop starts
        writer = WriterThread(prepared.writer, config.queue_batches, config.progress, start,
                              total=limit)
        writer.start()
        try:
            _device_loop(config, teacher, itertools.islice(seqs, start, limit),
                         list(manifest.layer_ids), writer, start)
            writer.close()
            final = prepared.writer.finish()
        except BaseException as e:
            # A failure of the device loop (not of the writer) keeps the commits of what it had
            # already queued; then the uncommitted parts are dropped either way.
            writer.abort(drain=not isinstance(e, KeyboardInterrupt) and writer.error is None)
            raise
    return _summary(writer.sequences, config.seq_len, prepared.writer.bytes_written, t0, t1, out,
                    final.num_records)


def _device_loop(config: DumpConfig, teacher, seqs, layer_ids, writer, start: int) -> None:
    for index, ids, mask, valid in _batches(seqs, config.batch_size, config.seq_len, start):
        attention = np.ones_like(ids)  # packed sequences: every position is a real token
        feats = teacher.features(ids, attention, layer_ids)  # dispatched, not awaited
        if feats.dtype != BF16:  # cast on the device: half the bytes to transfer
            feats = feats.astype(BF16)
        writer.put((index, ids, mask, feats, valid))


def _summary(sequences: int, seq_len: int, nbytes: int, t0: float, t1: float, out: str,
             total: int) -> dict:
    """This run's work. `seconds` (and tokens_per_s) time the dump loop, from the loaded teacher
    to the final commit; `setup_seconds` is everything before (teacher load, resume checks)."""
    end = time.perf_counter()
    seconds, tokens = end - t1, sequences * seq_len
    return {"sequences": sequences, "tokens": tokens, "bytes": nbytes,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "setup_seconds": round(t1 - t0, 3),
            "total_sequences": total, "complete": True, "out": out}
