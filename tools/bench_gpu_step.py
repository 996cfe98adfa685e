"""GPU step bench: one training step of the gpt-oss-20b-shaped DFlash draft, with random weights
and random features -> step time, tokens/s, MFU against the measured bf16 matmul peak, and the
share of the step spent in attention. Pure JAX (model/ and train/ only: no EasyDeL, no torch).

    python -m tools.bench_gpu_step                 # the device machine (run tool, timeout_s=600)
    python -m tools.bench_gpu_step --tiny          # CPU smoke test at a tiny shape (~1 min)

Shape (DFLASH.md, z-lab/gpt-oss-20b-DFlash): 8 layers, hidden 2880, FFN 7680, 64 q / 8 kv heads,
head_dim 64, attention bias, block 8, T=3072, 512 anchors per sequence, vocab 201,088, K=5
teacher layers (features 14400 wide). The step is train.step.jit_step itself (AdamW, clip,
chunked CE); `--attention` picks the block-sparse attention kernels to compare
(model.attention.block_sparse_attention, set through TrainConfig.attention; the trainer's
default "auto" is pallas_gpu on GPU, pallas_tpu on TPU).

FLOPs (written out in `flop_count`, per step, b sequences, M = b*N*B block tokens, T context):
  model FLOPs (MFU): matmuls of the draft layers on block tokens 3 * 2*M*(2*H*Hq*D + 2*H*Hk*D +
  3*H*I); context K/V projections 3 * 2*b*T*H*2*Hk*D per layer (fc is trained, so d(ctx) is
  needed); fc 2 * 2*b*T*(K*H)*H (no grad w.r.t. the features); frozen LM head 2 * 2*b*N*(B-1)*H*V
  (forward + d(hidden), no d(head)); attention 3 * 4*B*Hq*D * sum_n(a_n + B) per layer (only the
  visible keys: context before each anchor plus its own block).
  executed FLOPs add what the kernels really spend: the "xla" attention scores every block
  against all T context keys and recomputes its forward in the backward (4 * 4*M*(T+B)*Hq*D per
  layer); cuDNN's dense mask spends 3 * 4*M*(T+M)*Hq*D; the Pallas block-sparse kernels spend
  3.5 * 4*B*Hq*D * (keys of the tiles they visit: own block tile + context tiles up to each q
  tile's anchors, `kernel_attention_flops`); the chunked CE recomputes the logits in
  its backward (3 * 2*b*N*(B-1)*H*V). Norms, RoPE, softmax exps and AdamW are not counted.
XLA's own cost_analysis() count is printed too (it counts a while-loop body once, so it misses
most of the chunked attention and CE: a lower bound, for reference only).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import numpy as np

# gpt-oss-20b's HF config, the fields DraftConfig.from_target reads.
GPT_OSS_20B_HF = {
    "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201_088, "intermediate_size": 2880,
    "num_local_experts": 32, "rms_norm_eps": 1e-5, "attention_bias": True,
    "max_position_embeddings": 131_072, "rope_theta": 150_000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False}}
TINY_HF = {"hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "intermediate_size": 128,
           "rms_norm_eps": 1e-5, "attention_bias": True, "max_position_embeddings": 1024,
           "rope_theta": 10_000.0}


def flop_count(dcfg, *, b: int, seq_len: int, anchors: np.ndarray, attention: str) -> dict:
    """Model and executed FLOPs of one step (formulas in the module docstring)."""
    h, i, v, bs = dcfg.hidden_size, dcfg.intermediate_size, dcfg.vocab_size, dcfg.block_size
    hq, hk, d, L, k = (dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.head_dim,
                       dcfg.num_hidden_layers, dcfg.num_features)
    n = anchors.shape[1]
    m = b * n * bs
    f = hq * d
    layer_mm = 3 * 2 * m * (2 * h * f + 2 * h * hk * d + 3 * h * i)
    ctx_kv = 3 * 2 * b * seq_len * h * 2 * hk * d
    fc = 2 * 2 * b * seq_len * k * h * h
    head = 2 * 2 * b * n * (bs - 1) * h * v
    attn_model = 3 * 4 * bs * f * float(np.sum(np.minimum(anchors, seq_len) + bs))
    model = L * (layer_mm + ctx_kv + attn_model) + fc + head
    if attention in ("pallas_tpu", "pallas_gpu"):
        attn_exec = kernel_attention_flops(dcfg, b=b, seq_len=seq_len, anchors=anchors,
                                           kernel=attention)
    else:
        attn_exec = {"xla": 4 * 4 * m * (seq_len + bs) * f,
                     "cudnn": 3 * 4 * m * (seq_len + n * bs) * f,
                     "dense": 3 * 4 * m * (seq_len + n * bs) * f}[attention]
    executed = L * (layer_mm + ctx_kv + attn_exec) + fc + head * 3 / 2
    return {"model_flops": model, "executed_flops": executed,
            "parts_model": {"layer_matmuls": L * layer_mm, "context_kv": L * ctx_kv, "fc": fc,
                            "lm_head": head, "attention_visible": L * attn_model},
            "attention_executed": L * attn_exec}


def kernel_attention_flops(dcfg, *, b: int, seq_len: int, anchors: np.ndarray, kernel: str,
                           window: int | None = None) -> float:
    """Executed FLOPs of one layer's block-sparse Pallas kernel, fwd + bwd: per q tile of G
    blocks, 4*G*B*F*(G*B + tiles*block_k) forward (own block keys plus the context tiles its
    anchors reach), and 2.5x that in the fused backward (5 matmuls to the forward's 2)."""
    import importlib

    mod = importlib.import_module(f"model.kernels.block_sparse_{kernel.split('_')[1]}")
    n, bs = anchors.shape[1], dcfg.block_size
    p = mod.plan_for((b, n, bs, dcfg.num_attention_heads, dcfg.head_dim), seq_len,
                     dcfg.num_key_value_heads)
    from model.kernels.mask import visible_tile_count

    keys = b * p.n_qt * p.gb + visible_tile_count(anchors, p, window) * p.tk
    return 3.5 * 4 * p.gb * dcfg.num_attention_heads * dcfg.head_dim * keys


def matmul_peak(n: int, iters: int) -> float:
    """Measured bf16 matmul TFLOP/s: an n x n x n product, `iters` chained in one program."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    bmat = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16) / n ** 0.5

    @jax.jit
    def chain(x):
        return jax.lax.fori_loop(0, iters, lambda _, y: (y @ bmat).astype(jnp.bfloat16), x)

    chain(a).block_until_ready()
    t = min(_wall(lambda: chain(a).block_until_ready()) for _ in range(3))
    return 2 * n ** 3 * iters / t / 1e12


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def attention_layer_time(dcfg, *, b, seq_len, anchors, implementation, repeat=3) -> float:
    """Seconds of one layer's block-sparse attention, forward + backward (grad w.r.t. q, k, v)."""
    import jax
    import jax.numpy as jnp

    from model.attention import block_sparse_attention

    n, bs, hq, hk, d = (anchors.shape[1], dcfg.block_size, dcfg.num_attention_heads,
                        dcfg.num_key_value_heads, dcfg.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(2), 5)
    q = jax.random.normal(keys[0], (b, n, bs, hq, d), jnp.bfloat16)
    kc = jax.random.normal(keys[1], (b, seq_len, hk, d), jnp.bfloat16)
    vc = jax.random.normal(keys[2], (b, seq_len, hk, d), jnp.bfloat16)
    kb = jax.random.normal(keys[3], (b, n, bs, hk, d), jnp.bfloat16)
    vb = jax.random.normal(keys[4], (b, n, bs, hk, d), jnp.bfloat16)
    a = jnp.asarray(anchors)

    def loss(q, kc, vc, kb, vb):
        o = block_sparse_attention(q, kc, vc, kb, vb, a, causal=False, window=None,
                                   scale=d ** -0.5, implementation=implementation)
        return o.astype(jnp.float32).sum()

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    jax.block_until_ready(g(q, kc, vc, kb, vb))
    return min(_wall(lambda: jax.block_until_ready(g(q, kc, vc, kb, vb))) for _ in range(repeat))


def build(args):
    """(dcfg, cfg, mesh, state, frozen, batch, anchors numpy) at the requested shape."""
    import jax
    import jax.numpy as jnp

    from model.config import DraftConfig
    from train import step as step_lib
    from train.anchors import draw_anchors
    from train.config import TrainConfig
    from train.mesh import make_mesh

    hf = TINY_HF if args.tiny else GPT_OSS_20B_HF
    dcfg = DraftConfig.from_target(hf, num_draft_layers=args.layers, block_size=args.block,
                                   mask_token_id=hf["vocab_size"] - 1, num_features=5,
                                   intermediate_size=None if not args.tiny else 128)
    cfg = TrainConfig(batch_size=args.batch, block_size=args.block, draft_layers=args.layers,
                      anchors_per_seq=args.anchors, steps=10_000, compute_dtype="bfloat16",
                      progress=False)
    mesh = make_mesh(None, jax.devices()[:1])
    init = functools.partial(step_lib.init_state, cfg, dcfg)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = step_lib.state_shardings(cfg, dcfg, mesh, abstract)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
    v, h, t = dcfg.vocab_size, dcfg.hidden_size, args.seq_len
    frozen_abs = {k: jax.ShapeDtypeStruct((v, h), jnp.bfloat16) for k in ("embed", "lm_head")}
    frozen_sh = step_lib.frozen_shardings(mesh, frozen_abs)
    make = lambda key, shape, sh: jax.jit(  # noqa: E731  random on the device: no host copy
        lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16),
        out_shardings=sh)(key)
    frozen = {name: make(jax.random.PRNGKey(10 + j), (v, h), frozen_sh[name])
              for j, name in enumerate(("embed", "lm_head"))}
    bsh = step_lib.batch_shardings(mesh)
    rng = np.random.default_rng(0)
    mask = np.ones((args.batch, t), np.uint8)
    mask[:, : t // 8] = 0  # a prompt prefix without loss, as in real data
    drawn = [draw_anchors(mask[r], args.anchors, seed=0, epoch=0, index=r)
             for r in range(args.batch)]
    anchors = np.stack([a for a, _ in drawn])
    batch = {
        "input_ids": jax.device_put(rng.integers(0, v, (args.batch, t), dtype=np.int32),
                                    bsh["input_ids"]),
        "loss_mask": jax.device_put(mask, bsh["loss_mask"]),
        "features": make(jax.random.PRNGKey(20), (args.batch, t, dcfg.num_features * h),
                         bsh["features"]) * 50,  # teacher hidden states are O(10-100)
        "anchors": jax.device_put(anchors, bsh["anchors"]),
        "anchor_valid": jax.device_put(np.stack([v_ for _, v_ in drawn]), bsh["anchor_valid"])}
    return dcfg, cfg, mesh, state, state_sh, frozen, frozen_sh, batch, anchors


def time_step(dcfg, cfg, mesh, state, state_sh, frozen, frozen_sh, batch, *, attention, steps):
    """(compile s, median step s, cost_analysis flops, memory stats) of train.step's jitted step
    with the draft's attention kernel set to `attention`."""
    import jax

    from train import step as step_lib

    step_fn = step_lib.jit_step(cfg.replace(attention=attention), dcfg, mesh, state_sh, frozen_sh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    state, metrics = compiled(state, frozen, batch)  # warm-up
    loss0 = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return state, {"compile_s": compile_s, "step_s": statistics.median(times),
                   "step_times_s": [round(x, 4) for x in times],
                   "xla_cost_flops": float((cost or {}).get("flops", 0.0)),
                   "temp_gib": mem.temp_size_in_bytes / 2**30 if mem else None,
                   "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
                   "loss_first": loss0, "loss_last": float(metrics["loss"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--attention", default=None,
                   help="comma list of kernels: xla,cudnn,dense,pallas_gpu,pallas_tpu "
                        "(default: xla,cudnn,pallas_gpu on GPU, xla,pallas_tpu on TPU, xla)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="skip the remaining parts once this much wall time has passed")
    p.add_argument("--out", default=os.environ.get("OUT"), help="also write gpu_step.json here")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    import jax

    from tools._bench_common import report

    backend = jax.default_backend()
    a.layers, a.block = (2, 8) if a.tiny else (8, 8)
    a.seq_len, a.anchors = (128, 16) if a.tiny else (3072, 512)
    a.batch = a.batch or 2
    a.steps = a.steps or (2 if a.tiny else 5)
    kernels = (a.attention or {"gpu": "xla,cudnn,pallas_gpu", "tpu": "xla,pallas_tpu"}.get(
        backend, "xla")).split(",")

    peak = matmul_peak(1024 if a.tiny else 8192, 2 if a.tiny else 20)
    dcfg, cfg, mesh, state, state_sh, frozen, frozen_sh, batch, anchors = build(a)
    tokens = a.batch * a.seq_len
    rows, results = [], {}
    for kernel in kernels:
        if time.perf_counter() - t_start > a.budget_s:
            rows.append({"what": f"step attention={kernel}", "note": "skipped: --budget-s"})
            continue
        state, r = time_step(dcfg, cfg, mesh, state, state_sh, frozen, frozen_sh, batch,
                             attention=kernel, steps=a.steps)
        fl = flop_count(dcfg, b=a.batch, seq_len=a.seq_len, anchors=anchors, attention=kernel)
        r.update(fl)
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = fl["model_flops"] / r["step_s"] / (peak * 1e12)
        r["hfu"] = fl["executed_flops"] / r["step_s"] / (peak * 1e12)
        if time.perf_counter() - t_start < a.budget_s:
            one = attention_layer_time(dcfg, b=a.batch, seq_len=a.seq_len, anchors=anchors,
                                       implementation=kernel)
            r["attention_layer_fwd_bwd_s"] = one
            r["attention_share"] = dcfg.num_hidden_layers * one / r["step_s"]
        results[kernel] = r
        rows.append({"what": f"step attention={kernel}", "step_ms": r["step_s"] * 1e3,
                     "tokens_per_s": r["tokens_per_s"], "model_TFLOP": fl["model_flops"] / 1e12,
                     "MFU": r["mfu"], "HFU": r["hfu"], "attn_share": r.get("attention_share"),
                     "compile_s": r["compile_s"], "peak_GiB": r["peak_gib"]})
    loss_mem = None
    if time.perf_counter() - t_start < a.budget_s:  # compile-only: chunked vs dense CE memory
        from tools.bench_trainer import loss_memory

        mrows, loss_mem = loss_memory(dcfg.vocab_size, dcfg.hidden_size, a.anchors, a.block,
                                      cfg.vocab_chunk, cfg.token_chunk, dtypes=("bfloat16",))
        rows += [{"what": r["what"], "note": f"{r['value']:.3f} {r['unit']}"} for r in mrows]
    summary = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
               "jax": jax.__version__, "bf16_matmul_peak_tflops": peak, "tiny": a.tiny,
               "shape": {"batch": a.batch, "seq_len": a.seq_len, "anchors": a.anchors,
                         "block": a.block, "layers": a.layers, "hidden": dcfg.hidden_size,
                         "ffn": dcfg.intermediate_size, "heads": dcfg.num_attention_heads,
                         "kv_heads": dcfg.num_key_value_heads, "vocab": dcfg.vocab_size},
               "results": results, "loss_memory": loss_mem,
               "goal_mfu_ge_55pct_attn_le_12pct": any(  # issue 14's goal at batch 2
                   r["mfu"] >= 0.55 and r.get("attention_share", 1.0) <= 0.12
                   for r in results.values()),
               "wall_s": time.perf_counter() - t_start}
    out = report("gpu_step", ["what", "step_ms", "tokens_per_s", "model_TFLOP", "MFU", "HFU",
                              "attn_share", "compile_s", "peak_GiB", "note"], rows, summary)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_step.json"), "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
