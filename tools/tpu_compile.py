"""Compile the TPU programs ahead of time for a real topology, on any machine, and report whether
they fit: the TPU counterpart of the GPU bench, needing no accelerator.

    .venv-tpu/bin/python -m tools.tpu_compile --topology v5e:2x4               # draft step
    .venv-tpu/bin/python -m tools.tpu_compile --topology v5e:2x4 --remat --batch-size 32
    .venv-tpu/bin/python -m tools.tpu_compile --program teacher --teacher gpt-oss-20b \\
        --topology v5e:2x4 --batch-size 8          # the dump's defaults: mesh, attention
    .venv-tpu/bin/python -m tools.tpu_compile --program regenerate --teacher gpt-oss-20b \\
        --topology v5e:2x4 --batch-size 64                  # decode + prefill, tokens/s roofline
    .venv-tpu/bin/python -m tools.tpu_compile --program online --topology v5e:2x4 \\
        --batch-size 2                                      # teacher forward + draft step

Needs libtpu (`make tpu-venv` builds .venv-tpu = .venv + libtpu; the main .venv has none, since
with libtpu importable every JAX process probes for a TPU). `--program draft` compiles the
trainer's jitted step (train.aot: the same program, shardings and rules table train.main runs,
with abstract inputs); `--program teacher` the dump's EasyDeL GPT-OSS forward with abstract
weights (tools._tpu_teacher). Prints a table and one JSON line: per-chip memory (arguments, temp,
output, code) from XLA's memory analysis, the chip's HBM, fit and margin, compile time, XLA's
flop count and, for the draft, a step-time ESTIMATE from model FLOPs at the chip's peak; for the
teacher a roofline tokens/s ESTIMATE (tools._teacher_roofline).
Exit 0 when it fits, 1 when it does not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from train.config import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m tools.tpu_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x4",
                   help="libtpu topology name, e.g. v5e:2x2, v5e:2x4 (v5e-8), v5p:2x2x1 (v5p-8), "
                        "v6e:2x4 (v6e-8) (default: v5e:2x4)")
    p.add_argument("--program", choices=("draft", "teacher", "regenerate", "online"), default="draft",
                   help="draft: the trainer's step; teacher: the dump's forward; regenerate: the "
                        "regeneration decoder's decode step and prefill (tools._tpu_regenerate); "
                        "online: teacher forward + draft step, as online training runs them "
                        "(tools._tpu_online)")
    p.add_argument("--teacher", default="gpt-oss-20b",
                   help="gpt-oss-20b, gpt-oss-120b, tiny, or an HF config.json / snapshot dir")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step (default: trainer {d.batch_size}, teacher dump 8, "
                        "regenerate 256)")
    p.add_argument("--seq-len", type=int, default=3072, help="tokens per sequence (dump default)")
    p.add_argument("--num-features", type=int, default=5, help="K teacher layers (dump default)")
    p.add_argument("--anchors-per-seq", type=int, default=d.anchors_per_seq)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--draft-layers", type=int, default=d.draft_layers)
    p.add_argument("--mesh", default=d.mesh, help="trainer mesh, e.g. data=2,fsdp=4 "
                   "(default: fsdp over every chip)")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=d.remat)
    p.add_argument("--arch", choices=("dflash", "dflash2"), default=d.arch,
                   help="draft architecture (train.main --arch)")
    p.add_argument("--attention", default=d.attention, choices=("auto", "xla", "dense", "pallas_tpu"),
                   help=f"draft attention kernel, as the trainer's flag (default: {d.attention}: "
                        "pallas_tpu on TPU)")
    p.add_argument("--sharding-axis-dims", default=None,
                   help="teacher: EasyDeL mesh dp,fsdp,ep,tp,sp (default: the dump's, "
                        "pipeline.teacher.sharding: fsdp over every chip, experts sharded)")
    p.add_argument("--teacher-attention", default="blocksparse", choices=("blocksparse", "vanilla"),
                   help="teacher: EasyDeL attention (default: blocksparse, the dump's on TPU)")
    p.add_argument("--cache-len", type=int, default=4096,
                   help="regenerate: KV cache slots per sequence (prompt + new tokens)")
    p.add_argument("--model-shards", type=int, default=None,
                   help="regenerate: the decoder mesh's model axis (default: every chip that "
                        "divides the KV heads and expert width; the rest split the batch)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="regenerate: weights, cache and matmul dtype (default bfloat16)")
    return p


def main(argv=None) -> int:
    import os

    # Before JAX starts its backends: libtpu's machine-wide lockfile would serialise compiles
    # (no TPU is attached, so there is no chip to guard).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    opts = build_parser().parse_args(argv)
    if opts.batch_size is None:
        opts.batch_size = {"draft": 16, "teacher": 8, "regenerate": 256, "online": 8}[opts.program]
    for name in ("batch_size", "seq_len", "num_features"):
        if getattr(opts, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        from tools import _tpu_report as rep
        if opts.program == "regenerate":
            from tools import _tpu_regenerate as rep
            row = rep.regenerate_report(opts)
        elif opts.program == "online":
            from tools._tpu_online import online_report
            row = online_report(opts)
        else:
            row = rep.draft_report(opts) if opts.program == "draft" else rep.teacher_report(opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep.format_table(row))
    print(json.dumps(row), flush=True)
    return 1 if row["memory"]["fits"] is False else 0


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
