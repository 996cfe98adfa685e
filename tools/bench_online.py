"""Online training bench: the online step (teacher forward + draft step, as train.loop runs them:
train/online.py's Lookahead dispatching the next batch's forward ahead of the step) against the
teacher forward alone plus the draft step alone, in one run, with the tiny teacher.

    python -m tools.bench_online [--steps 20 --seq-len 256 --batch-size 8 --repeat 3]

All three use the trainer's own programs (train.online.TeacherFeatures, train.aot's step) over
the same pre-tokenized batches already held on the host (the loader is not timed), dispatch
asynchronously and block once at the end; the three are timed in turn, `--repeat` times
(interleaved, so a load change on a shared host affects all three alike), medians reported.
Goal (issue 21): online <= 1.10 x (teacher + draft). Prints a table and one `BENCH_JSON {...}` line.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from tools._bench_common import report
from train import aot
from train.config import TrainConfig
from train.loader import make_dataset, num_anchors_for, to_global
from train.loop import draft_config_for
from train.online import Lookahead, TOKEN_KEYS, open_online

ROOT = Path(__file__).resolve().parents[1]


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(steps: int, seq_len: int, batch: int, draft_layers: int, anchors: int,
          repeat: int) -> dict:
    data = Path(tempfile.mkdtemp(prefix="bench_online_"))
    for f in sorted((ROOT / "model").glob("*.py")) + sorted((ROOT / "train").glob("*.py")):
        (data / f.name).write_bytes(f.read_bytes())
    cfg = TrainConfig.tiny(teacher="tiny", data=str(data), out=str(data / "run"), seq_len=seq_len,
                           batch_size=batch, draft_layers=draft_layers, anchors_per_seq=anchors,
                           block_size=8, compute_dtype="bfloat16", vocab_chunk=1024,
                           token_chunk=1024, steps=10_000)
    src = open_online(cfg)
    m = src.manifest
    dcfg = draft_config_for(cfg, m, src.hf_config)
    prog = aot.step_program(cfg, dcfg, src.mesh, seq_len=m.seq_len, feature_dim=m.feature_dim,
                            num_anchors=num_anchors_for(m, cfg.anchors_per_seq))
    state = jax.jit(prog.init, out_shardings=prog.state_sh)(jax.random.PRNGKey(0))
    frozen = {k: jax.device_put(jax.numpy.zeros(v.shape, v.dtype), prog.frozen_sh[k])
              for k, v in prog.frozen.items()}
    it = iter(make_dataset(src.tokens, global_batch=batch, anchors_per_seq=cfg.anchors_per_seq,
                           seed=0, read_threads=1, prefetch=2))
    host = [next(it) for _ in range(steps + 1)]
    it.close()
    tokens = [to_global(b, prog.batch_sh, TOKEN_KEYS) for b in host]
    feats = [src.features(t["input_ids"]) for t in tokens]
    jax.block_until_ready(feats)
    held = [dict(t, features=f) for t, f in zip(tokens, feats)]
    box = {"state": state}

    def teacher_alone():
        jax.block_until_ready([src.features(t["input_ids"]) for t in tokens[:steps]])

    def draft_alone():
        s = box["state"]
        for b in held[:steps]:
            s, metrics = prog.step_fn(s, frozen, b)
        jax.block_until_ready((s, metrics))
        box["state"] = s

    class _Host:  # the loader's iterator over the held host batches (Lookahead reads its state)
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return host[self.i - 1]

        def get_state(self):
            return {"i": self.i}

    def online():
        batches = Lookahead(_Host(), lambda b: src.device_batch(b, prog.batch_sh))
        s = box["state"]
        for _ in range(steps):
            s, metrics = prog.step_fn(s, frozen, next(batches))
        jax.block_until_ready((s, metrics))
        box["state"] = s

    runs = {"teacher": teacher_alone, "draft": draft_alone, "online": online}
    for fn in runs.values():
        fn()  # compile / warm up
    times = {k: [] for k in runs}
    for _ in range(repeat):  # interleaved: a load change on a shared host hits all three alike
        for k, fn in runs.items():
            times[k].append(_once(fn))
    t_teacher, t_draft, t_online = (statistics.median(times[k]) for k in runs)
    per = lambda t: round(t / steps * 1e3, 2)  # noqa: E731
    return {"teacher_ms_per_step": per(t_teacher), "draft_ms_per_step": per(t_draft),
            "online_ms_per_step": per(t_online),
            "online_over_sum": round(t_online / (t_teacher + t_draft), 3),
            "steps": steps, "seq_len": seq_len, "batch": batch, "draft_layers": draft_layers,
            "anchors": anchors, "repeat": repeat, "devices": jax.device_count(),
            "backend": jax.default_backend()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_online", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps per timed run (default 20)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--draft-layers", type=int, default=1, help="draft layers (default 1)")
    p.add_argument("--anchors-per-seq", type=int, default=64, help="anchors (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs, median (default 3)")
    a = p.parse_args(argv)
    if min(a.steps, a.seq_len, a.batch_size, a.draft_layers, a.anchors_per_seq, a.repeat) < 1:
        p.error("every size must be >= 1")
    r = bench(a.steps, a.seq_len, a.batch_size, a.draft_layers, a.anchors_per_seq, a.repeat)
    report("online step vs teacher forward + draft step (tiny teacher)", ["what", "ms_per_step"], [
        {"what": "teacher forward alone", "ms_per_step": r["teacher_ms_per_step"]},
        {"what": "draft step alone", "ms_per_step": r["draft_ms_per_step"]},
        {"what": "online step", "ms_per_step": r["online_ms_per_step"]}], r)
    print(f"online / (teacher + draft) = {r['online_over_sum']} (goal <= 1.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
