"""Dump bench: tokens/s of the teacher dump vs the bare jitted teacher forward on the same batches
(how much of the writer's cost the writer thread hides).

    python -m tools.bench_dump --root /dev/shm/dflash_bench [--n 64 --seq-len 256 --batch 8]

Tiny teacher (tools.make_tiny_teacher: GPT-OSS, 8 layers, hidden 128, K=5 -> 640 features per
token) on the CPU devices present. The forward is compiled once before anything is timed; the
timed runs alternate (bare, to-host, dump, ...) and the median of `--repeat` is reported.
  bare forward       teacher.features(...) per batch, block_until_ready: the device's share alone
  forward + to host  the same plus np.asarray of the features (the transfer the writer waits on)
  dump               pipeline.dump.run.run_dump over the same sequences (writer thread, ArrayRecord
                     parts, ledger commits, fsync, CRC32), tokens_per_s from its summary
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time

import numpy as np

from tools._bench_common import report, scratch_dir


def _sequences(n: int, seq_len: int, vocab: int):
    out = []
    for i in range(n):
        r = np.random.default_rng([7, i])
        mask = np.ones(seq_len, np.uint8)
        mask[: seq_len // 4] = 0
        out.append((r.integers(0, vocab, seq_len, dtype=np.int32), mask))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/dev/shm/dflash_bench", help="scratch directory (removed)")
    p.add_argument("--model", default="tiny", help="teacher (default: the tiny GPT-OSS)")
    p.add_argument("--n", type=int, default=64, help="sequences per timed run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from pipeline.dump.run import DumpConfig, _batches, run_dump, select_layers
    from pipeline.teacher.easydel_teacher import Teacher

    teacher = Teacher.from_pretrained(a.model, dtype=jnp.dtype(a.dtype))
    seqs = _sequences(a.n, a.seq_len, teacher.vocab_size)
    cfg = DumpConfig(model=a.model, out=str(scratch_dir(a.root, "dump")), shards=2,
                     seq_len=a.seq_len, batch_size=a.batch, max_seqs=a.n, overwrite=True,
                     dtype=a.dtype, commit_every=4 * a.batch, progress=False)
    layers = list(select_layers(cfg, teacher.num_layers))
    batches = [(ids, np.ones_like(ids)) for _, ids, _, _ in _batches(seqs, a.batch, a.seq_len, 0)]
    tokens = a.n * a.seq_len

    def bare(to_host: bool):
        def run():
            for ids, att in batches:
                f = teacher.features(ids, att, layers)
                f = f.astype(jnp.bfloat16) if f.dtype != jnp.bfloat16 else f
                np.asarray(f) if to_host else f.block_until_ready()
        return run

    def dump():
        summary = run_dump(cfg, teacher=teacher, sequences=iter(seqs), log=lambda *_: None)
        return summary["tokens_per_s"]

    bare(True)()  # compile (same jitted program the dump uses: same teacher, shapes, layers)
    times = {"bare forward": [], "forward + to host": [], "dump": []}
    for _ in range(a.repeat):
        for name, fn in (("bare forward", bare(False)), ("forward + to host", bare(True))):
            t0 = time.perf_counter()
            fn()
            times[name].append(tokens / (time.perf_counter() - t0))
        times["dump"].append(dump())
    shutil.rmtree(cfg.out, ignore_errors=True)
    tps = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"run": k, "tokens_per_s": v, "x_bare": v / tps["bare forward"],
             "all_runs": [round(x) for x in times[k]]} for k, v in tps.items()]
    summary = {"model": a.model, "devices": [str(d) for d in jax.devices()][:1] + [
                   f"... {len(jax.devices())} devices"],
               "n": a.n, "seq_len": a.seq_len, "batch": a.batch, "dtype": a.dtype,
               "feature_dim": len(layers) * teacher.hidden_size,
               "dump_x_bare": tps["dump"] / tps["bare forward"],
               "goal_dump_ge_0.95x_bare": tps["dump"] >= 0.95 * tps["bare forward"]}
    return report("dump", ["run", "tokens_per_s", "x_bare", "all_runs"], rows, summary)


if __name__ == "__main__":
    main()
