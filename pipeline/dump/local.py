"""One host's dump into one cache directory: prepare or resume the cache, run the teacher over
the sequences batch by batch, hand the features to the writer thread, commit by ledger.
`pipeline.dump.run.run_dump` calls it once, or once per host through pipeline/dump/hosts.py.
"""
from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.cache.feature_sums import feature_sums
from pipeline.cache.format import BF16, CacheManifest
from pipeline.cache.prepare import lock_cache, prepare_cache
from pipeline.cache.verify import check_complete
from pipeline.dump.sources import load_teacher
from pipeline.dump.writer import WriterThread
from pipeline.errors import UserError
from pipeline.preempt import Preempted, StopOnSignal


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
            with StopOnSignal() as stop:
                _device_loop(config, teacher, itertools.islice(seqs, start, limit),
                             list(manifest.layer_ids), writer, start, stop)
            writer.close()
            if stop.requested is not None:  # SIGTERM: the queued batches are written, then stop
                prepared.writer.abort()  # drops the uncommitted interval; the ledger is intact
                raise Preempted(
                    f"stopped by SIGTERM; {prepared.writer.ledger.committed} sequences committed "
                    f"in {out}; rerun the same command to resume")
            final = prepared.writer.finish()
        except BaseException as e:
            # A failure of the device loop (not of the writer) keeps the commits of what it had
            # already queued; then the uncommitted parts are dropped either way.
            if not isinstance(e, Preempted):
                writer.abort(drain=not isinstance(e, KeyboardInterrupt) and writer.error is None)
            raise
    return _summary(writer.sequences, config.seq_len, prepared.writer.bytes_written, t0, t1, out,
                    final.num_records)


def _device_loop(config: DumpConfig, teacher, seqs, layer_ids, writer, start: int,
                 stop=None) -> None:
    for index, ids, mask, valid in _batches(seqs, config.batch_size, config.seq_len, start):
        if stop is not None and stop.requested is not None:
            return
        attention = np.ones_like(ids)  # packed sequences: every position is a real token
        feats = teacher.features(ids, attention, layer_ids)  # dispatched, not awaited
        if feats.dtype != BF16:  # cast on the device: half the bytes to transfer
            feats = feats.astype(BF16)
        # the sums the trainer's step checks, from the bytes before they leave the device
        writer.put((index, ids, mask, feats, valid, _feature_sums(feats)))


@functools.cache
def _feature_sums_jit():
    import jax  # the teacher has loaded it already
    return jax.jit(feature_sums)


def _feature_sums(feats):
    """[b, 2] uint32 feature sums of a batch, dispatched where the features are (not awaited)."""
    return _feature_sums_jit()(feats)


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
