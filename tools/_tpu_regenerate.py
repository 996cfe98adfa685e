"""`tools.tpu_compile --program regenerate`: the regeneration decoder (pipeline.speculative) compiled
for a TPU topology with abstract weights, and a roofline estimate of its tokens/s.

Two programs, the two bodies of `pipeline.speculative.generate._generate`'s loops, with the
weights in bf16 sharded as `load_target` places them (pipeline.speculative.weights: default mesh)
and the KV cache donated:
  decode:  `decode_step`, one token for each of --batch-size rows on a --cache-len cache, with
           the recipe's sampling (temperature 0.7, top-p 0.95: a sort over the vocab per row);
  prefill: `prefill_step`, one chunk of prompt columns (BatchGenerator's chunk for that batch).
It fits when both fit (the loop holds one of them at a time, plus the [batch, new tokens] output).

Roofline of the decode step, per chip (each chip does the same work): the bytes it must read
from HBM (its share of the attention and LM-head weights and of the embedding rows it looks up,
of the experts the step's tokens route to: E (1 - (1 - k/E)^tokens) of E with uniform routing, and of the KV cache: the whole
--cache-len slots on full-attention layers, which this decoder reads masked at every step, the
window on sliding layers) over the chip's HBM bandwidth, and its FLOPs over the bf16 peak; the
step takes at least the larger. tokens/s = batch / that time. An upper bound: collectives,
the vocab sort and kernel efficiency come on top.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from pipeline.errors import UserError

GB = 1e9
# HBM bandwidth per chip, bytes/s (Google Cloud TPU documentation), keyed by train.aot Chip.name
HBM_BANDWIDTH = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}
RECIPE_SAMPLING = dict(temperature=0.7, top_p=0.95)  # README step 1


def _abstract_cache(s, rows: int, size: int):
    from pipeline.speculative.target import CACHE_SPEC

    sh = NamedSharding(s.mesh, CACHE_SPEC)
    k = tuple(jax.ShapeDtypeStruct((rows, s.kv_heads, s.head_dim, size), s.jnp_dtype, sharding=sh)
              for _ in range(s.num_layers))
    v = tuple(jax.ShapeDtypeStruct((rows, s.kv_heads, size, s.head_dim), s.jnp_dtype, sharding=sh)
              for _ in range(s.num_layers))
    return (k, v)


def roofline(s, chip, *, batch: int, cache_len: int) -> dict:
    """Bytes, FLOPs and the time bound of one decode step, per chip (module docstring)."""
    from pipeline.speculative.weights import param_bytes

    item = jnp.dtype(s.jnp_dtype).itemsize
    chips, model, data = s.model_shards * s.data_shards, s.model_shards, s.data_shards
    rows = batch // data  # rows one chip serves (its data shard; all of them over its model shard)
    h, hd = s.hidden, s.head_dim
    expert_params = 3 * h * s.intermediate  # gate, up, down
    experts_bytes = s.num_layers * s.experts * expert_params * item
    hit = 1.0 - (1.0 - s.top_k / s.experts) ** rows
    embed_bytes = s.vocab * h * item  # a step reads `rows` rows of it, not the table
    weights = (param_bytes(s) - experts_bytes - embed_bytes + hit * experts_bytes
               + rows * h * item) / model
    full = sum(1 for x in s.layer_sliding if not x)
    window = min(s.sliding_window or cache_len, cache_len)
    kv_row_slot = 2 * s.kv_heads * hd * item  # K and V of one slot, all KV heads
    kv = rows * kv_row_slot * (full * cache_len + (s.num_layers - full) * window) / model
    attn_params = s.num_layers * (2 * s.heads * hd * h + 2 * s.kv_heads * hd * h)
    active = attn_params + s.num_layers * s.top_k * expert_params + s.vocab * h
    flops = 2 * rows * active / model
    flops += 4 * rows * s.heads * hd * (full * cache_len + (s.num_layers - full) * window) / model
    bw, peak = HBM_BANDWIDTH.get(chip.name), chip.peak_bf16_flops
    t_mem, t_flops = (weights + kv) / bw, flops / peak
    step = max(t_mem, t_flops)
    return {"chips": chips, "weight_bytes_per_chip": int(weights), "kv_bytes_per_chip": int(kv),
            "experts_hit_fraction": round(hit, 4), "flops_per_chip": float(flops),
            "hbm_bandwidth": bw, "t_memory_s": t_mem, "t_flops_s": t_flops, "step_s": step,
            "bound": "memory" if t_mem >= t_flops else "flops",
            "tokens_per_s": batch / step}


def regenerate_report(opts) -> dict:
    """Compile decode and prefill for opts.topology at opts.batch_size, opts.cache_len."""
    from pipeline.speculative import generate as gen
    from pipeline.speculative import weights
    from tools._tpu_report import _xla_flops, memory_row, oom_row, teacher_hf_config
    from train import aot

    devices = aot.topology_devices(opts.topology)
    hf = teacher_hf_config(opts.teacher)
    mesh = weights.decoder_mesh(devices, hf, opts.model_shards)
    s = weights.shape_from_config(hf, (0,), dtype=opts.dtype, mesh=mesh)
    if opts.batch_size % s.data_shards:
        raise UserError(f"--batch-size {opts.batch_size} is not a multiple of the mesh's data "
                        f"axis ({s.data_shards})")
    if opts.cache_len < 2 or opts.cache_len % 64:
        raise UserError(f"--cache-len must be a positive multiple of 64, got {opts.cache_len}")
    b = opts.batch_size
    chunk = gen.prefill_chunk(b, 64, 8192)
    params = weights.param_shapes(s)
    cache = _abstract_cache(s, b, opts.cache_len)
    rows = NamedSharding(mesh, P(weights.DATA))
    i32 = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
    scalar = NamedSharding(mesh, P())
    sampling = gen.SamplingConfig(max_new_tokens=opts.cache_len // 2, **RECIPE_SAMPLING)
    keys = jax.ShapeDtypeStruct((b, 2), jnp.uint32, sharding=NamedSharding(mesh, P(weights.DATA, None)))
    programs = {
        "decode": (jax.jit(functools.partial(gen.decode_step, s, sampling), donate_argnums=(1,)),
                   (params, cache, i32((b,), rows), i32((), scalar), i32((), scalar),
                    i32((b,), rows), keys)),
        "prefill": (jax.jit(functools.partial(gen.prefill_step, s), donate_argnums=(1,)),
                    (params, cache, i32((b, chunk), NamedSharding(mesh, P(weights.DATA, None))),
                     i32((), scalar), i32((b,), rows))),
    }
    hbm = aot.device_hbm_bytes(devices[0], devices)
    chip = aot.chip_for(devices[0])
    out = {}
    for name, (fn, args) in programs.items():
        t0 = time.perf_counter()
        try:
            with aot.target_backend("tpu"):
                compiled = aot.compile_lowered(fn.lower(*args))
            mem, flops = memory_row(compiled, 0, hbm), _xla_flops(compiled)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
            accessed = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
        except aot.DoesNotFit as e:
            mem, flops, accessed = oom_row(e, hbm), None, None
        out[name] = {"memory": mem, "xla_flops": flops, "xla_bytes_accessed": accessed,
                     "compile_s": round(time.perf_counter() - t0, 1)}
    fits = [p["memory"]["fits"] for p in out.values()]
    worst = max(out.values(), key=lambda p: p["memory"]["total"] or 0)
    row = {"program": "regenerate", "topology": opts.topology, "teacher": opts.teacher,
           "mesh": dict(mesh.shape), "batch_size": b, "cache_len": opts.cache_len,
           "prefill_chunk": chunk, "dtype": s.dtype, "sampling": RECIPE_SAMPLING,
           "decode": out["decode"], "prefill": out["prefill"],
           # the tool's shared verdict: the larger of the two programs
           "memory": dict(worst["memory"], fits=None if None in fits else all(fits)),
           "compile_s": round(sum(p["compile_s"] for p in out.values()), 1),
           "xla_flops": out["decode"]["xla_flops"],
           "chips": len(devices), "chip": chip.name if chip else None,
           "peak_flops_total": chip.peak_bf16_flops * len(devices) if chip else None}
    if chip is not None and chip.name in HBM_BANDWIDTH:
        row["roofline"] = roofline(s, chip, batch=b, cache_len=opts.cache_len)
    return row


def _g(n) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f} GiB"


def format_table(row: dict) -> str:
    lines = [f"regenerate on {row['topology']} ({row['chips']} x {row['chip']}), {row['teacher']} "
             f"{row['dtype']}, mesh {row['mesh']}, batch {row['batch_size']}, cache "
             f"{row['cache_len']}, prefill chunk {row['prefill_chunk']}"]
    for name in ("decode", "prefill"):
        p, m = row[name], row[name]["memory"]
        verdict = ("unknown" if m["fits"] is None else
                   f"{'fits' if m['fits'] else 'DOES NOT FIT'} (margin {_g(m['margin'])})")
        lines.append(f"  {name:8s} arguments {_g(m['arguments'])}, temp {_g(m['temp'])}, total "
                     f"{_g(m['total'])} / {_g(m['hbm'])}: {verdict}; compiled in {p['compile_s']} s")
        if m.get("compile_error"):
            lines.append(f"           XLA refused it: {m['compile_error']}")
    r = row.get("roofline")
    if r:
        lines.append(f"  decode roofline per chip: {r['weight_bytes_per_chip'] / GB:.2f} GB weights "
                     f"(experts hit {r['experts_hit_fraction']:.0%}) + {r['kv_bytes_per_chip'] / GB:.2f}"
                     f" GB KV -> {r['t_memory_s'] * 1e3:.2f} ms at {r['hbm_bandwidth'] / GB:.0f} GB/s; "
                     f"{r['flops_per_chip']:.3e} FLOPs -> {r['t_flops_s'] * 1e3:.2f} ms at peak")
        lines.append(f"  ESTIMATE: {r['tokens_per_s']:,.0f} tokens/s ({r['bound']}-bound, step "
                     f"{r['step_s'] * 1e3:.2f} ms; an upper bound)")
    return "\n".join(lines)
