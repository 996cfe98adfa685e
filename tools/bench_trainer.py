"""Trainer bench: step time with the real loader vs a batch held in device memory (input pipeline
overhead), and compiled peak memory of the chunked CE vs a dense-logits CE at vocab 201,088.

    python -m tools.bench_trainer --root /dev/shm/dflash_bench [--steps 10 --seq-len 512]

Part 1 runs train.step's jitted step (train.loader.make_dataset feeding it through
train.loader.to_global, as train.loop does) on one device, over a synthetic cache in the dump's
default format (`--format` to pick). "held" reuses one batch already on the device; "loader"
pulls every batch from Grain. Both dispatch asynchronously and block once at the end, like the
training loop, so the loader can overlap the device's work. On this CPU host the loader's
threads and XLA share the same two cores; on an accelerator host the device computes while the
CPU reads.
Part 2 compiles only (nothing runs): jax's memory_analysis() of grad(loss) w.r.t. the draft's
hidden states for one sequence (512 anchors x block 8, H=2880), chunked (train.loss.dflash_loss,
TrainConfig's vocab/token chunks) vs dense logits [tokens, 201088] in float32.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import time

import numpy as np

from pipeline.cache.format import DEFAULT_FORMAT, FORMATS
from tools._bench_common import GPT_OSS_20B, report, scratch_dir, write_synthetic_cache


def step_overhead(root: str, *, steps: int, seq_len: int, hidden: int, num_features: int,
                  anchors: int, batch: int, layers: int, vocab: int, threads: int,
                  repeat: int, fmt: str = DEFAULT_FORMAT) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp

    from model.config import DraftConfig
    from train import step as step_lib
    from train.config import TrainConfig
    from train.loader import (features_checked_on_device, make_dataset, open_training_cache,
                              to_global)
    from train.mesh import make_mesh

    path = scratch_dir(root, "trainer_cache")
    write_synthetic_cache(path, max(4 * batch, 16), seq_len, hidden, num_features, shards=2,
                          commit_every=8, fmt=fmt)
    cache = open_training_cache(path)
    cfg = TrainConfig.tiny(batch_size=batch, block_size=8, draft_layers=layers,
                           anchors_per_seq=anchors, read_threads=threads, prefetch=2 * batch,
                           steps=10_000, vocab_chunk=1024, token_chunk=1024)
    heads = max(2, hidden // 32)
    dcfg = DraftConfig.tiny(hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=2, head_dim=32, vocab_size=vocab, block_size=8,
                            mask_token_id=vocab - 1,
                            target_layer_ids=tuple(range(1, num_features + 1)),
                            num_target_layers=num_features + 3, max_position_embeddings=4 * seq_len)
    mesh = make_mesh(None, jax.devices()[:1])
    init = functools.partial(step_lib.init_state, cfg, dcfg)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = step_lib.state_shardings(cfg, dcfg, mesh, abstract)
    rng = np.random.default_rng(0)
    frozen_np = {k: rng.standard_normal((vocab, hidden), np.float32) * 0.02
                 for k in ("embed", "lm_head")}
    frozen_sh = step_lib.frozen_shardings(mesh, frozen_np)
    frozen = {k: jax.device_put(v, frozen_sh[k]) for k, v in frozen_np.items()}
    checks = features_checked_on_device(cache)  # as train.loop: the step checks the sums
    step_fn = step_lib.jit_step(cfg, dcfg, mesh, state_sh, frozen_sh, feature_sums=checks)
    batch_sh = step_lib.batch_shardings(mesh, feature_sums=checks)
    it = iter(make_dataset(cache, global_batch=batch, anchors_per_seq=anchors, seed=0,
                           read_threads=threads, prefetch=2 * batch, device_checks=checks))
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
    held = to_global(next(it), batch_sh)
    state, m = step_fn(state, frozen, held)  # compile
    jax.block_until_ready(m)

    def run(use_loader: bool) -> float:
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(steps):
            b = to_global(next(it), batch_sh) if use_loader else held
            state, metrics = step_fn(state, frozen, b)
        jax.block_until_ready((state, metrics))
        return (time.perf_counter() - t0) / steps

    def loader_alone() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(to_global(next(it), batch_sh))
        return (time.perf_counter() - t0) / steps

    times = {"held": [], "loader": [], "loader alone": []}
    for _ in range(repeat):
        times["held"].append(run(False))
        times["loader"].append(run(True))
        times["loader alone"].append(loader_alone())
    shutil.rmtree(path, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rec_mb = cache.manifest.record_nbytes / 1e6
    rows = [{"what": f"step, batch {k}" if k != "loader alone" else "next batch alone (no step)",
             "value": v * 1e3, "unit": "ms",
             "all": [round(x * 1e3, 1) for x in times[k]]} for k, v in med.items()]
    overhead = med["loader"] / med["held"] - 1
    rows.append({"what": "input overhead", "value": overhead * 100, "unit": "%"})
    rows.append({"what": "features fed", "value": batch * rec_mb / med["loader"] / 1e3,
                 "unit": "GB/s"})
    return rows, {"input_overhead": overhead, "goal_overhead_le_5pct": overhead <= 0.05,
                  "step_shape": {"seq_len": seq_len, "hidden": hidden, "K": num_features,
                                 "anchors": anchors, "batch": batch, "layers": layers,
                                 "vocab": vocab, "record_mb": rec_mb, "read_threads": threads,
                                 "format": fmt,
                                 "compute_dtype": cfg.compute_dtype, "device": str(jax.devices()[0])}}


def loss_memory(vocab: int, hidden: int, anchors: int, block: int, vocab_chunk: int,
                token_chunk: int, dtypes=("bfloat16", "float32")) -> tuple[list[dict], dict]:
    """Compiled temp memory of grad(loss) w.r.t. hidden, chunked vs dense, per input dtype.

    On XLA:CPU a bf16 head costs a hoisted f32 copy of the whole [V, H] head (the CPU has no bf16
    dot, and the convert is loop-invariant, so it leaves the vocab scan): ~2.2 GiB at gpt-oss
    shapes that a GPU/TPU does not pay; the float32 row shows the chunking itself."""
    rows, out = [], {}
    for dt in dtypes:
        r, o = _loss_memory(vocab, hidden, anchors, block, vocab_chunk, token_chunk, dt)
        rows += r
        out[dt] = o
    return rows, out


def _loss_memory(vocab, hidden, anchors, block, vocab_chunk, token_chunk, dtype):
    import jax
    import jax.numpy as jnp

    from train.loss import decay_weights, dflash_loss

    weights = jnp.asarray(decay_weights(block, 4.0))
    shapes = (jax.ShapeDtypeStruct((1, anchors, block, hidden), jnp.dtype(dtype)),
              jax.ShapeDtypeStruct((vocab, hidden), jnp.dtype(dtype)),
              jax.ShapeDtypeStruct((1, anchors, block), jnp.int32),
              jax.ShapeDtypeStruct((1, anchors, block), jnp.bool_))

    def chunked(h, w, lab, sup):
        return dflash_loss(h, w, lab, sup, weights, vocab_chunk=vocab_chunk,
                           token_chunk=token_chunk)[0]

    def dense(h, w, lab, sup):
        logits = jnp.einsum("bnkh,vh->bnkv", h[:, :, 1:], w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        lab_logit = jnp.take_along_axis(logits, lab[:, :, 1:, None], axis=-1)[..., 0]
        wt = weights[1:] * sup[:, :, 1:]
        return ((lse - lab_logit) * wt).sum() / jnp.maximum(wt.sum(), 1e-9)

    rows, out = [], {}
    for name, fn in (("chunked CE", chunked), ("dense-logits CE", dense)):
        compiled = jax.jit(jax.grad(fn)).lower(*shapes).compile()
        ma = compiled.memory_analysis()
        temp = ma.temp_size_in_bytes
        peak = temp + ma.argument_size_in_bytes + ma.output_size_in_bytes
        rows.append({"what": f"{name} {dtype} fwd+bwd temp", "value": temp / 2**30,
                     "unit": "GiB"})
        rows.append({"what": f"{name} {dtype} fwd+bwd temp+args+out", "value": peak / 2**30,
                     "unit": "GiB"})
        out[name] = {"temp_bytes": temp, "peak_bytes": peak}
    logits_gib = anchors * (block - 1) * vocab * 4 / 2**30
    rows.append({"what": "one f32 logits tensor [tokens, V]", "value": logits_gib, "unit": "GiB"})
    ratio = out["dense-logits CE"]["temp_bytes"] / max(out["chunked CE"]["temp_bytes"], 1)
    return rows, {"loss_memory": out, "dense_over_chunked_temp": ratio,
                  "loss_shape": {"vocab": vocab, "hidden": hidden, "anchors": anchors,
                                 "block": block, "vocab_chunk": vocab_chunk,
                                 "token_chunk": token_chunk, "backend": jax.default_backend()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/dev/shm/dflash_bench", help="scratch directory (removed)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--num-features", type=int, default=5)
    p.add_argument("--anchors", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2, help="Grain read threads")
    p.add_argument("--format", default=DEFAULT_FORMAT, choices=FORMATS,
                   help="the synthetic cache's part format (default: the dump's, %(default)s)")
    p.add_argument("--loss-vocab", type=int, default=GPT_OSS_20B["vocab"])
    p.add_argument("--loss-hidden", type=int, default=GPT_OSS_20B["hidden"])
    p.add_argument("--loss-anchors", type=int, default=GPT_OSS_20B["anchors"])
    p.add_argument("--vocab-chunk", type=int, default=8192, help="TrainConfig.vocab_chunk")
    p.add_argument("--token-chunk", type=int, default=4096, help="TrainConfig.token_chunk")
    p.add_argument("--skip-step", action="store_true", help="only the loss-memory part")
    a = p.parse_args(argv)
    rows, summary = [], {}
    if not a.skip_step:
        rows, summary = step_overhead(
            a.root, steps=a.steps, seq_len=a.seq_len, hidden=a.hidden,
            num_features=a.num_features, anchors=a.anchors, batch=a.batch, layers=a.layers,
            vocab=a.vocab, threads=a.threads, repeat=a.repeat, fmt=a.format)
    mrows, msum = loss_memory(a.loss_vocab, a.loss_hidden, a.loss_anchors,
                              GPT_OSS_20B["block"], a.vocab_chunk, a.token_chunk)
    return report("trainer", ["what", "value", "unit", "all"], rows + mrows,
                  {**summary, "loss": msum})


if __name__ == "__main__":
    main()
