"""Build the embedded tiny GPT-OSS teacher: tokenizer + trained weights as a standard HF snapshot.

    python -m tools.make_tiny_teacher                       # -> /dev/shm/dflash/models/tiny-gpt-oss
    python -m tools.make_tiny_teacher --seed 1 --steps 50 --out /tmp/tiny

`--model tiny` calls `ensure_tiny_teacher()`, which builds the snapshot once (under a file lock,
into a temporary directory renamed into place, so a killed build never leaves half a snapshot)
and then loads it exactly like a downloaded gpt-oss snapshot.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.teacher.tiny import (  # noqa: F401  (re-exported: tests and tools use mtt.*)
    DEFAULT_OUT, KNOWN_WEIGHTS_SHA256, RECIPE_VERSION, REPORT, SNAPSHOT_FILES, _build_lock,
    build, ensure_tiny_teacher, is_complete)
from pipeline.teacher.tiny_recipe import TinyTeacherConfig


def main(argv: list[str] | None = None) -> int:
    defaults = TinyTeacherConfig()
    p = argparse.ArgumentParser(prog="python -m tools.make_tiny_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="snapshot directory (replaced)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="init and data-order seed")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop training after this many minutes (then not deterministic)")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--corpus", type=Path, default=None,
                   help="directory of .py/.txt files to train on (default: the Python stdlib)")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(defaults, seed=args.seed, steps=args.steps, max_minutes=args.minutes,
                              threads=args.threads, batch_size=args.batch_size, seq_len=args.seq_len)
    try:
        if args.corpus is not None and not args.corpus.is_dir():
            raise UserError(f"--corpus {args.corpus}: not a directory")
        with _build_lock(args.out):
            build(args.out, cfg, corpus_dir=args.corpus)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
