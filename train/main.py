"""Train a DFlash draft on a feature cache; rerun the same command to resume.

    python -m train.main --data /dev/shm/dflash/ --out runs/gpt-oss-20b

Defaults are the z-lab gpt-oss-20b draft (8 layers, block 8) and the paper's recipe (512 anchors
per sequence, AdamW 6e-4, 4% warmup + cosine, clip 1.0). Ends by printing one JSON line:
{"steps", "final_loss", "expected_tau", "tokens_per_s", "seconds", "memory", "eval"}.

Held-out evaluation: --eval-fraction of the cache (default 2%, at most --eval-max sequences) is
never trained on, or --eval-data names a separate cache; every --eval-every steps and at the
end, per-slot accuracy, loss and simulated tau (what greedy serving measures, replayed offline:
pipeline/speculative/simulate.py) on it go to metrics.jsonl (eval_* keys) and TensorBoard (eval/).

Before the first step the compiled step's memory is estimated (train/memory.py, also written to
<run>/memory.json); a run that cannot fit stops with one line naming the flags that shrink it. A
step with a non-finite loss, gradient or update stops the run (exit 2), keeping the last good
checkpoint.

Online training (train/online.py): `--teacher MODEL --data RAW` runs the teacher inside the loop
on the devices and trains on its features as they are computed, with no cache; everything else
(flags, checkpoints, held-out evaluation, export) is the same. Use it when the cache would not
fit (`python -m pipeline.teacher_dump --plan` says); a cache pays the teacher once, online pays
it every epoch (README, "Cache or online?").

Several hosts (JAX multi-controller): every host runs the same command with
`--coordinator-address host0:port --num-processes P --process-id p`, or `--distributed` on a TPU
pod; each reads only its own rows of the cache and the global batch spans all of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline import distributed
from pipeline.errors import UserError
from train.config import TrainConfig
from pipeline.preempt import PREEMPTED_EXIT, Preempted

_HELP = {
    "data": "feature cache directory (manifest.json + shards) from pipeline.teacher_dump; with "
            "--teacher: raw data as teacher_dump --data reads it (text/.py files, dir, glob, "
            "jsonl, parquet, saved dataset)",
    "out": "run directory: checkpoints, metrics.jsonl, tb/, draft_params.msgpack, export/",
    "steps": "optimizer steps of the whole run (the cosine schedule spans them)",
    "batch_size": "global batch in sequences (divisible by data x fsdp)",
    "block_size": "draft block size B", "draft_layers": "draft decoder layers",
    "anchors_per_seq": "anchors drawn per sequence per epoch (capped by the sequence)",
    "intermediate_size": "draft FFN width (default: derived from the teacher)",
    "gamma": "slot-decay gamma (default 7/5/4 for block 16/10/8)",
    "mesh": "mesh sizes, e.g. data=2,fsdp=2,tensor=2 (default: fsdp over local devices)",
    "seed": "seeds init, per-epoch shuffle and anchor draws",
    "save_every": "steps between checkpoints and draft_params.msgpack",
    "compute_dtype": "bfloat16 or float32 (master params stay float32)",
    "attention": "attention kernel: auto (Pallas block-sparse on TPU/GPU, xla on CPU), xla, "
                 "dense, cudnn, pallas_tpu, pallas_gpu",
    "memory_limit_gb": "host memory the run may take in GB (default: what the host has free)",
    "eval_data": "held-out cache to evaluate on (default: hold out --eval-fraction of --data)",
    "eval_fraction": "fraction of --data never trained on, evaluated (>= 1 sequence; 0: none)",
    "eval_max": "at most this many held-out sequences",
    "eval_every": "steps between held-out evaluations (0: only the last step)",
    "arch": "draft architecture: dflash, or dflash2 (+ local convolutions and candidate "
            "selector)",
    "selector_alpha": "dflash2: weight of the selector's cross-entropy in the loss",
    "teacher": "online training: run this teacher (HF snapshot dir, cached repo id or 'tiny') "
               "in the loop on raw --data instead of reading a cache",
    "seq_len": "online: tokens per sequence (teacher_dump --seq-len)",
    "max_seqs": "online: use the first this many sequences of --data (teacher_dump --max-seqs)",
    "teacher_layers": "online: K teacher layers as features (teacher_dump --num-layers)",
    "teacher_dtype": "online: teacher compute dtype, bfloat16 or float32",
    "teacher_mesh": "online: teacher mesh sizes dp,fsdp,ep,tp,sp over the same devices "
                    "(default: sized to the devices)",
}
_TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        help_ = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=help_)
        else:  # "int", "float | None", ...: the first word names the type
            p.add_argument(flag, type=_TYPES[f.type.split(" ")[0]], default=default, help=help_)
    distributed.add_flags(p)
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    dist = distributed.pop_flags(args)
    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        distributed.process_group(dist)  # before any backend starts: jax.distributed must come first
        from train.loop import train
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM: saved; exit 75 says "rerun to resume" (train/preempt.py)
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
