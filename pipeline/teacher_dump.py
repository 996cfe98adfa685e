"""Dump the teacher's per-token features into a sharded, resumable cache.

    python -m pipeline.teacher_dump --model tiny --shards 8 --seq-len 256 --max-seqs 64
    python -m pipeline.teacher_dump --model openai/gpt-oss-20b --data chats.jsonl --shards 64
    python -m pipeline.teacher_dump ... --format tensorstore --kvstore gs://bucket/cache/
    python -m pipeline.teacher_dump ... --distributed     # every host of a TPU pod runs this
    python -m pipeline.teacher_dump --plan --model openai/gpt-oss-20b --data chats.jsonl

Rerun the same command after an interruption to resume; a finished cache is verified and left
as it is. `--verify --out DIR` only checks the cache in DIR (pipeline/cache/verify.py).
`--plan` only says how big the cache will be and whether it fits in --out (sequences, tokens,
bytes, free space; pipeline/dump/plan.py); a dump that cannot fit is refused before it starts,
suggesting --max-seqs or online training (`python -m train.main --teacher MODEL --data DATA`).
Prints one JSON line at the end: {sequences, tokens, bytes, seconds, tokens_per_s, ...}.
"""
from __future__ import annotations

import argparse
import sys

from pipeline import distributed
from pipeline.dump.run import DumpConfig, run_dump
from pipeline.errors import run_resumable_cli

_D = DumpConfig()


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _axis_dims(text):
    if text is None:
        return None
    from pipeline.teacher.jax_setup import parse_axis_dims  # no jax import at module level
    return parse_axis_dims(text)


def parse_args(argv=None) -> DumpConfig:
    p = argparse.ArgumentParser(prog="python -m pipeline.teacher_dump", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    dflt = " (default %(default)s)"
    add = p.add_argument
    add("--model", default=_D.model,
        help="HF snapshot dir, repo id in the local HF cache, or 'tiny'" + dflt)
    add("--data", default=None, help="text/.py files, dir, glob, .jsonl, parquet or saved "
        "dataset (default: the built-in corpus)")
    add("--out", default=_D.out, help="cache directory" + dflt)
    add("--shards", type=int, default=_D.shards, help="number of shards" + dflt)
    add("--seq-len", type=int, default=_D.seq_len, help="tokens per sequence" + dflt)
    add("--batch-size", type=int, default=_D.batch_size, help="sequences per teacher call" + dflt)
    add("--layer-ids", type=_ints, default=None,
        help="comma-separated teacher layer ids (default: build_target_layer_ids(L, K))")
    add("--num-layers", type=int, default=_D.num_layers,
        help="K, the number of teacher layers when --layer-ids is not given" + dflt)
    add("--sharding-axis-dims", default=None, help="EasyDeL mesh sizes dp,fsdp,ep,tp,sp, "
        "e.g. 1,1,1,8,1 (default: fsdp over every chip with the experts sharded over it, so "
        "--batch-size must be a multiple of the chip count; tp over every device on CPU)")
    add("--attention", default=_D.attention, choices=("auto", "blocksparse", "vanilla"),
        help="teacher attention: blocksparse (splash, with sinks and sliding window; T padded to "
        "a multiple of 512) or vanilla (materialises the [T, T] scores); auto = blocksparse on "
        "TPU, vanilla on CPU; recorded in the manifest" + dflt)
    add("--max-seqs", type=int, default=None, help="stop after this many sequences")
    add("--overwrite", action="store_true", help="delete an existing cache in --out first")
    add("--dtype", default=_D.dtype, choices=("bfloat16", "float32"),
        help="teacher compute dtype; features are stored as bfloat16" + dflt)
    add("--commit-every", type=int, default=_D.commit_every,
        help="sequences between ledger commits: the most work a crash loses" + dflt)
    add("--block-size", type=int, default=_D.block_size,
        help="draft block size; sequences must be longer" + dflt)
    add("--queue-batches", type=int, default=_D.queue_batches,
        help="batches buffered between device and writer" + dflt)
    add("--no-progress", action="store_true", help="no progress bar")
    add("--verify", action="store_true", help="only check every part of the cache in --out "
        "(size, checksum, records) and list the bad ones; exit 1 if any")
    add("--format", default=_D.format, choices=("arrayrecord", "tensorstore"),
        help="part storage: TensorStore zarr3 parts (the loader reads them about as fast as the "
        "files can be read) or ArrayRecord files (default: tensorstore; a resumed dump keeps "
        "its cache's format)")
    add("--kvstore", default=None, help="TensorStore data root URL for --format tensorstore, "
        "e.g. gs://bucket/cache/ (default: --out; manifest and ledger stay in --out)")
    add("--plan", action="store_true", help="only print the number of sequences and tokens, the "
        "cache size, the free space in --out and whether it fits (tokenizes --data; loads no "
        "teacher, writes nothing)")
    distributed.add_flags(p)
    a = p.parse_args(argv)
    if a.verify:
        return a
    return DumpConfig(
        model=a.model, data=a.data, out=a.out, shards=a.shards, seq_len=a.seq_len,
        batch_size=a.batch_size, layer_ids=a.layer_ids, num_layers=a.num_layers,
        sharding_axis_dims=_axis_dims(a.sharding_axis_dims), attention=a.attention,
        max_seqs=a.max_seqs,
        overwrite=a.overwrite, dtype=a.dtype, commit_every=a.commit_every, block_size=a.block_size,
        queue_batches=a.queue_batches, progress=not a.no_progress, format=a.format,
        kvstore=a.kvstore, coordinator_address=a.coordinator_address,
        num_processes=a.num_processes, process_id=a.process_id, distributed=a.distributed,
        plan=a.plan)


def main(argv=None, *, teacher=None, sequences=None) -> int:
    """CLI entry; `teacher`/`sequences` inject a stand-in (tests), as in `run_dump`."""
    def body():
        config = parse_args(argv)
        if isinstance(config, argparse.Namespace):  # --verify
            from pipeline.cache.verify import run
            return run(config.out, progress=not config.no_progress)
        return run_dump(config, teacher=teacher, sequences=sequences,
                        log=lambda msg: print(msg, file=sys.stderr))

    return run_resumable_cli(body)


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
