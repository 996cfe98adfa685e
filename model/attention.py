"""DFlash attention: dense for one block (inference form), block-sparse for training.

Visibility follows `dflash==0.1.0` `_attention_mask` on the index of [context ; block]:
full layers see everything; causal layers (sliding by default) see keys at index <= the query's;
a sliding window keeps keys with q - k < window (and k - q < window when not causal). In the
training form, the block of anchor a sits at positions a..a+B-1 and sees context positions < a
plus its own block, which is exactly the inference form run on context [0, a).

Shapes: b batch, N blocks, B block size, T context length, Hq query heads, Hk kv heads, D head dim.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked context row must not give NaN
CHUNK_SCORE_BYTES = 1 << 30  # default float32 score budget per chunk of blocks ("xla")


def visible(q_pos, k_pos, *, causal: bool, window: int | None):
    """Boolean visibility of key position k_pos from query position q_pos (broadcasting)."""
    vis = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    if causal:
        vis &= k_pos <= q_pos
    if window is not None:
        vis &= q_pos - k_pos < window
        if not causal:
            vis &= k_pos - q_pos < window
    return vis


def dense_attention(q, k, v, mask, scale: float):
    """Softmax attention with GQA.

    q [b, S, Hq, D], k/v [b, L, Hk, D], mask [b|1, S, L] bool or None -> [b, S, Hq, D]."""
    b, s, hq, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, s, hk, hq // hk, d)
    scores = jnp.einsum("bshrd,blhd->bhrsl", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhrsl,blhd->bshrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, hq, d).astype(q.dtype)


def inference_mask(q_len: int, k_len: int, *, causal: bool, window: int | None):
    """[1, q_len, k_len] mask of the reference (queries are the last q_len of the k_len keys).

    None when every key is visible (full layers)."""
    if not causal and window is None:
        return None
    q_pos = k_len - q_len + jnp.arange(q_len)[:, None]
    return visible(q_pos, jnp.arange(k_len)[None, :], causal=causal, window=window)[None]


def block_sparse_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors, *, causal: bool,
                           window: int | None, scale: float, implementation: str = "xla",
                           chunk_blocks: int | None = None, block_k: int | None = None,
                           interpret: bool = False):
    """Attention of N blocks of one sequence: each sees context positions < its anchor + its block.

    q, k_blk, v_blk: [b, N, B, H*, D] (block n at positions anchors[n] + 0..B-1, RoPE applied);
    k_ctx, v_ctx: [b, T, Hk, D] (context at positions 0..T-1, computed once for the sequence);
    anchors: [b, N] int32 in [0, T]. Returns [b, N, B, Hq, D].

    implementation and what it costs (per layer, F = Hq*D, fwd; bwd ~2x). Measured in issue 2
    on an H100 (jax 0.11.2), gpt-oss-20b shapes (T=3072, N=512, B=16, 64/8 heads), one layer
    fwd+bwd: dense mask via XLA 89 ms / 59 GB; unchunked split 45 ms / 26 GB; cuDNN 20.5 ms / 1 GB.
      "xla" (default): context part [N*B queries x T keys] and block part [N x B x B], merged by a
        joint max / sum (the log-sum-exp merge of two softmax pieces), evaluated in chunks of
        `chunk_blocks` blocks under lax.map with rematerialisation, so peak memory is one chunk's
        scores, b*C*B*Hq*T*4 bytes (default C keeps it under CHUNK_SCORE_BYTES), never N*B*T per
        head for the whole sequence; the backward recomputes each chunk (one extra forward).
        FLOPs 4*N*B*(T+B)*F. Sliding layers gather only the window-1 context keys before each
        anchor, so their cost is 4*N*B*(window-1+B)*F.
      "auto": resolve_implementation(name, jax.default_backend(), q.dtype).
      "pallas_tpu" (the trainer's "auto" on TPU): block-sparse Pallas TPU kernel
        (model.kernels.block_sparse_tpu), forward and fused backward. Per q tile of
        `chunk_blocks` blocks (default ~512 rows of blocks x offsets x the query heads of one kv
        head) it visits only the context tiles of `block_k` keys (default 512) its anchors can
        see, so FLOPs follow the visible mask: ~4*B*F*sum_n(a_n + B) plus about one partial
        tile per q tile (fwd; bwd 2.5x). The whole context K/V of one (sequence, kv head) sits
        in VMEM (T*D*2 bytes each, 0.4 MiB at T=3072, D=64).
      "pallas_gpu" (the trainer's "auto" on GPU): the same tiling as a Pallas Triton kernel
        (model.kernels.block_sparse_gpu; ~128-row q tiles, 64-key context tiles).
      Both run per shard under a mesh in context (_per_shard); interpret=True runs them in
      Pallas interpret mode (CPU tests).
      "dense": one [N*B, T+N*B] boolean mask through XLA (jax.nn.dot_product_attention): simple,
        4*N*B*(T+N*B)*F FLOPs and the whole score matrix in memory; a test oracle and fallback.
      "cudnn": the same dense mask through cuDNN flash attention (GPU, bf16/fp16): scores never
        materialised, yet all 4*N*B*(T+N*B)*F FLOPs are spent although only ~14% of the mask is
        visible.
    """
    if implementation == "auto":
        implementation = resolve_implementation("auto", jax.default_backend(), q.dtype)
    if implementation in _KERNELS:
        kernel = functools.partial(_KERNELS[implementation](), causal=causal, window=window,
                                   scale=scale, q_blocks=chunk_blocks, block_k=block_k,
                                   interpret=interpret)
        return _per_shard(kernel, q, k_ctx, v_ctx, k_blk, v_blk, anchors)
    if implementation in ("dense", "cudnn"):
        return _dense_masked(q, k_ctx, v_ctx, k_blk, v_blk, anchors, causal=causal,
                             window=window, scale=scale,
                             implementation=None if implementation == "dense" else "cudnn")
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}")
    return _split_chunked(q, k_ctx, v_ctx, k_blk, v_blk, anchors, causal=causal, window=window,
                          scale=scale, chunk_blocks=chunk_blocks)


HEAD_AXES = ("tensor",)  # mesh axes that split attention heads; every other axis splits batch


def _per_shard(kernel, q, k_ctx, v_ctx, k_blk, v_blk, anchors):
    """Run a Pallas kernel once per device on its own shard. XLA cannot partition a Pallas
    custom call: under jit with sharded operands it would gather them and run the whole batch
    on every device. With a mesh in context (jax.sharding.use_abstract_mesh, as train.step sets
    it) the batch is split over the mesh axes not in HEAD_AXES (those that divide it) and the
    kv heads over HEAD_AXES (when they divide them); attention is independent per sequence and
    per kv-head group, so each shard's result is exact."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k_ctx, v_ctx, k_blk, v_blk, anchors)
    P = jax.sharding.PartitionSpec

    def take(names, dim):
        taken, size = [], 1
        for a in names:
            if mesh.shape[a] > 1 and dim % (size * mesh.shape[a]) == 0:
                taken.append(a)
                size *= mesh.shape[a]
        return tuple(taken) or None

    batch = take([a for a in mesh.axis_names if a not in HEAD_AXES], q.shape[0])
    heads = take([a for a in mesh.axis_names if a in HEAD_AXES], k_ctx.shape[2])
    blk = P(batch, None, None, heads, None)
    ctx = P(batch, None, heads, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(blk, ctx, ctx, blk, blk, P(batch, None)),
                         out_specs=blk, check_vma=False)(q, k_ctx, v_ctx, k_blk, v_blk, anchors)


def _tpu_kernel():
    from model.kernels.block_sparse_tpu import block_sparse_tpu  # Pallas TPU: imported on use
    return block_sparse_tpu


def _gpu_kernel():
    from model.kernels.block_sparse_gpu import block_sparse_gpu  # Pallas Triton: imported on use
    return block_sparse_gpu


_KERNELS = {"pallas_tpu": _tpu_kernel, "pallas_gpu": _gpu_kernel}
IMPLEMENTATIONS = ("auto", "xla", "dense", "cudnn", "pallas_tpu", "pallas_gpu")
# Where each implementation compiles (None: everywhere); interpret mode is for tests only.
_BACKENDS = {"cudnn": ("gpu",), "pallas_tpu": ("tpu",), "pallas_gpu": ("gpu",)}


def resolve_implementation(name: str, backend: str, dtype) -> str:
    """The attention implementation to run: `name` itself, or for "auto" the block-sparse kernel
    of the backend (Pallas TPU on TPU, Pallas Triton on GPU) and "xla" on CPU, where the Pallas
    kernels only run interpreted. Raises ValueError for an unknown name or one that does not
    run on `backend` ("cudnn" also needs bf16/fp16)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r} (choose from "
                         f"{', '.join(IMPLEMENTATIONS)})")
    if name == "auto":
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend, "xla")
    if backend not in _BACKENDS.get(name, (backend,)):
        raise ValueError(f"attention implementation {name!r} runs on "
                         f"{'/'.join(_BACKENDS[name])}, not on {backend}")
    if name == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention implementation 'cudnn' needs bfloat16/float16, not "
                         f"{jnp.dtype(dtype).name}")
    return name


def _dense_masked(q, k_ctx, v_ctx, k_blk, v_blk, anchors, *, causal, window, scale, implementation):
    b, n, bs, hq, d = q.shape
    t = k_ctx.shape[1]

    def flat(x):  # [b, N, B, ...] -> [b, N*B, ...]
        return x.reshape(b, n * bs, *x.shape[3:])

    k = jnp.concatenate([k_ctx, flat(k_blk)], axis=1)
    v = jnp.concatenate([v_ctx, flat(v_blk)], axis=1)
    offs = jnp.arange(bs)
    q_pos = (anchors[:, :, None] + offs).reshape(b, n * bs, 1)
    a_q = jnp.repeat(anchors, bs, axis=1)[:, :, None]
    ctx_pos = jnp.arange(t)[None, None, :]
    ctx_vis = (ctx_pos < a_q) & visible(q_pos, ctx_pos, causal=causal, window=window)
    blk_id = jnp.repeat(jnp.arange(n), bs)
    in_blk = visible(offs[:, None], offs[None, :], causal=causal, window=window)
    blk_vis = (blk_id[:, None] == blk_id[None, :]) & jnp.tile(in_blk, (n, n))
    mask = jnp.concatenate([ctx_vis, jnp.broadcast_to(blk_vis, (b, n * bs, n * bs))], axis=2)
    out = jax.nn.dot_product_attention(flat(q), k, v, mask=mask[:, None], scale=scale,
                                       implementation=implementation)
    return out.reshape(q.shape)


def _split_chunked(q, k_ctx, v_ctx, k_blk, v_blk, anchors, *, causal, window, scale, chunk_blocks):
    b, n, bs, hq, d = q.shape
    t, hk = k_ctx.shape[1], k_ctx.shape[2]
    # Sliding layers only ever see the window-1 positions before the anchor: gather just those.
    span = t if window is None else min(t, window - 1)
    if chunk_blocks is None:
        per_block = b * bs * hq * max(span + bs, 1) * 4
        chunk_blocks = max(1, CHUNK_SCORE_BYTES // per_block)
    groups = math.ceil(n / min(chunk_blocks, n))
    c = math.ceil(n / groups)
    pad = groups * c - n

    def grouped(x):  # [b, N, ...] -> [G, b, C, ...], padding blocks (anchor 0) sliced off later
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, groups, c, *x.shape[2:]), 1, 0)

    qg = q.reshape(b, n, bs, hk, hq // hk, d)
    offs = jnp.arange(bs)
    blk_vis = visible(offs[:, None], offs[None, :], causal=causal, window=window)  # [B, B]

    def chunk(args):
        q_c, kb, vb, a = args  # [b, C, B, Hk, R, D], [b, C, B, Hk, D], .., [b, C]
        if span < t:  # window: context keys start..start+span-1, start chosen per block
            start = jnp.clip(a - span, 0, t - span)
            pos = start[..., None] + jnp.arange(span)  # [b, C, span]
            kc = jax.vmap(lambda kk, ix: kk[ix])(k_ctx, pos)  # [b, C, span, Hk, D]
            vc = jax.vmap(lambda vv, ix: vv[ix])(v_ctx, pos)
            s_ctx = jnp.einsum("bcqhrd,bckhd->bchrqk", q_c, kc, preferred_element_type=jnp.float32)
        else:
            pos = jnp.broadcast_to(jnp.arange(t), (*a.shape, t))
            s_ctx = jnp.einsum("bcqhrd,bkhd->bchrqk", q_c, k_ctx,
                               preferred_element_type=jnp.float32)
        q_pos = a[..., None, None] + offs[:, None]  # [b, C, B, 1]
        k_pos = pos[:, :, None, :]  # [b, C, 1, K]
        ctx_vis = (k_pos < a[..., None, None]) & visible(q_pos, k_pos, causal=causal, window=window)
        s_ctx = jnp.where(ctx_vis[:, :, None, None], s_ctx * scale, _NEG)
        s_blk = jnp.einsum("bcqhrd,bckhd->bchrqk", q_c, kb, preferred_element_type=jnp.float32)
        s_blk = jnp.where(blk_vis, s_blk * scale, _NEG)
        # One softmax over [context ; block]: shared max, summed normalisers (the LSE merge).
        m = jnp.maximum(s_ctx.max(-1, keepdims=True, initial=_NEG), s_blk.max(-1, keepdims=True))
        p_ctx, p_blk = jnp.exp(s_ctx - m), jnp.exp(s_blk - m)
        denom = p_ctx.sum(-1) + p_blk.sum(-1)  # >= 1: every query sees itself
        if span < t:
            o = jnp.einsum("bchrqk,bckhd->bcqhrd", p_ctx.astype(vc.dtype), vc,
                           preferred_element_type=jnp.float32)
        else:
            o = jnp.einsum("bchrqk,bkhd->bcqhrd", p_ctx.astype(v_ctx.dtype), v_ctx,
                           preferred_element_type=jnp.float32)
        o = o + jnp.einsum("bchrqk,bckhd->bcqhrd", p_blk.astype(vb.dtype), vb,
                           preferred_element_type=jnp.float32)
        o = o / jnp.moveaxis(denom, -1, 2)[..., None]
        return o.astype(q.dtype)

    xs = (grouped(qg), grouped(k_blk), grouped(v_blk), grouped(anchors))
    out = jax.lax.map(jax.checkpoint(chunk), xs)  # [G, b, C, B, Hk, R, D]
    out = jnp.moveaxis(out, 0, 1).reshape(b, groups * c, bs, hq, d)
    return out[:, :n]
