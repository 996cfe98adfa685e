"""Block-sparse DFlash training attention as a Pallas TPU kernel, forward and backward.

Grid (batch, kv head, q tile). Per program: one q tile (G blocks x B offsets x R query heads, the
rows of model.kernels.mask), its own G*B block keys, and the whole context K/V of that (batch, kv
head) resident in VMEM ([T, D] each; T=3072, D=64 is 0.4 MiB in bf16). The context tiles the tile
can see come from scalar-prefetched ranges (mask.tile_ranges) and are walked by dynamic-trip-count
loops, so fully masked tiles cost nothing: not a DMA, not a grid step. Tiles seen whole by every
row skip the mask. Online softmax (flash attention) over [block tile ; context tiles].

Backward: one fused kernel on the same grid recomputes p from the saved log-sum-exp and produces
dq (per q tile), dk/dv of the block keys (per q tile) and dk/dv of the context, accumulated in
f32 over the q tiles of one (batch, kv head) in output blocks that stay resident in VMEM (their
index does not change along the q-tile axis, which is therefore "arbitrary").

`interpret=True` runs the same kernels on CPU (the tests' proof; CI has no TPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels import mask as M

_NEG = float(jnp.finfo(jnp.float32).min)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_LANES = 128


def _row_state(anchors_ref, prow_ref, bi, t, p: M.Plan, window):
    """Per-row anchor a and lowest visible context key (window) as [tq, 1] int32 vectors."""
    prow = prow_ref[...][:, :1]  # g*B + i per row
    base = bi * p.n_pad + t * p.g
    a_row = jnp.full(prow.shape, anchors_ref[base], jnp.int32)
    start = jnp.zeros(prow.shape, jnp.int32)
    for g in range(1, p.g):  # G selects from SMEM scalars: no vector gather
        sel = prow >= g * p.bs
        a_row = jnp.where(sel, anchors_ref[base + g], a_row)
        start = jnp.where(sel, g * p.bs, start)
    low = None if window is None else a_row + (prow - start) - window + 1
    return a_row, low


def _ctx_mask(s, start, a_row, low):
    kpos = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    vis = kpos < a_row
    if low is not None:
        vis &= kpos >= low
    return vis


def _ranges(ranges_ref, bi, t, p: M.Plan):
    base = (bi * p.n_qt + t) * 4
    return ranges_ref[base], ranges_ref[base + 1], ranges_ref[base + 2], ranges_ref[base + 3]


def _masked_loops(lo, m1, m2, hi, body):
    """body(c, masked) over tiles [lo, m1) masked, [m1, m2) whole, [m2, hi) masked."""
    jax.lax.fori_loop(lo, m1, lambda c, _: body(c, True), None)
    jax.lax.fori_loop(m1, m2, lambda c, _: body(c, False), None)
    jax.lax.fori_loop(m2, hi, lambda c, _: body(c, True), None)


def _fwd_kernel(anchors_ref, ranges_ref, q_ref, kb_ref, vb_ref, kc_ref, vc_ref, prow_ref,
                bmask_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, p: M.Plan, scale, window):
    bi, t = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    # Own block first: every row sees itself, so m is finite from here on.
    s = jax.lax.dot_general(q, kb_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    s = jnp.where(bmask_ref[...] > 0, s, _NEG)
    m = s.max(-1, keepdims=True)
    pr = jnp.exp(s - m)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(pr.sum(-1, keepdims=True), l_scr.shape)
    acc_scr[...] = jnp.dot(pr.astype(vb_ref.dtype), vb_ref[...],
                           preferred_element_type=jnp.float32)
    a_row, low = _row_state(anchors_ref, prow_ref, bi, t, p, window)

    def body(c, masked):
        start = pl.multiple_of(c * p.tk, p.tk)
        k = kc_ref[pl.ds(start, p.tk), :]
        v = vc_ref[pl.ds(start, p.tk), :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_ctx_mask(s, start, a_row, low), s, _NEG)
        m_prev = m_scr[...][:, :1]
        m_next = jnp.maximum(m_prev, s.max(-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        pr = jnp.exp(s - m_next)
        l_new = alpha * l_scr[...][:, :1] + pr.sum(-1, keepdims=True)
        m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)
        acc_scr[...] = alpha * acc_scr[...] + jnp.dot(pr.astype(v.dtype), v,
                                                      preferred_element_type=jnp.float32)

    _masked_loops(*_ranges(ranges_ref, bi, t, p), body)
    l = l_scr[...]
    o_ref[...] = (acc_scr[...] / l[:, :1]).astype(o_ref.dtype)
    lse = m_scr[...] + jnp.log(l)  # [tq, 128], every lane equal
    lse_ref[...] = jnp.transpose(lse)[:1, :]  # lane-major [1, tq]: no 128x padding in HBM


def _bwd_kernel(anchors_ref, ranges_ref, q_ref, do_ref, lse_ref, dl_ref, kb_ref, vb_ref, kc_ref,
                vc_ref, prow_ref, bmask_ref, bmaskt_ref, dq_ref, dkb_ref, dvb_ref, dkc_ref,
                dvc_ref, dq_scr, *, p: M.Plan, scale, window):
    bi, t = pl.program_id(0), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        dkc_ref[...] = jnp.zeros_like(dkc_ref)
        dvc_ref[...] = jnp.zeros_like(dvc_ref)

    q, do = q_ref[...], do_ref[...]
    kb, vb = kb_ref[...], vb_ref[...]
    lse_r, dl_r = lse_ref[...], dl_ref[...]  # [1, tq]
    lse_c, dl_c = jnp.transpose(lse_r), jnp.transpose(dl_r)  # [tq, 1]
    # Block keys, transposed orientation ([G*B, tq]) for their own dk/dv: no transposes needed.
    st = jax.lax.dot_general(kb, q, _NT, preferred_element_type=jnp.float32) * scale
    pt = jnp.where(bmaskt_ref[...] > 0, jnp.exp(st - lse_r), 0.0)
    dpt = jax.lax.dot_general(vb, do, _NT, preferred_element_type=jnp.float32)
    dst = pt * (dpt - dl_r)
    dkb_ref[...] = (jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
                    * scale).astype(dkb_ref.dtype)
    dvb_ref[...] = jnp.dot(pt.astype(do.dtype), do,
                           preferred_element_type=jnp.float32).astype(dvb_ref.dtype)
    # ... and the row orientation for dq.
    s = jax.lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32) * scale
    pr = jnp.where(bmask_ref[...] > 0, jnp.exp(s - lse_c), 0.0)
    dp = jax.lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
    ds = pr * (dp - dl_c)
    dq_scr[...] = jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
    a_row, low = _row_state(anchors_ref, prow_ref, bi, t, p, window)

    def body(c, masked):
        start = pl.multiple_of(c * p.tk, p.tk)
        k = kc_ref[pl.ds(start, p.tk), :]
        v = vc_ref[pl.ds(start, p.tk), :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        pr = jnp.exp(s - lse_c)
        if masked:
            pr = jnp.where(_ctx_mask(s, start, a_row, low), pr, 0.0)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = pr * (dp - dl_c)
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        dkc_ref[pl.ds(start, p.tk), :] += jnp.dot(ds.T.astype(q.dtype), q,
                                                  preferred_element_type=jnp.float32)
        dvc_ref[pl.ds(start, p.tk), :] += jnp.dot(pr.T.astype(do.dtype), do,
                                                  preferred_element_type=jnp.float32)

    _masked_loops(*_ranges(ranges_ref, bi, t, p), body)
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)

    @pl.when(t == p.n_qt - 1)
    def _():
        dkc_ref[...] *= scale


def _specs(p: M.Plan):
    """BlockSpecs (index maps take the grid indices plus the two scalar-prefetch refs)."""
    row = pl.BlockSpec((None, None, p.tq, p.d), lambda b, h, t, *_: (b, h, t, 0))
    blk = pl.BlockSpec((None, None, p.gb, p.d), lambda b, h, t, *_: (b, h, t, 0))
    ctx = pl.BlockSpec((None, None, p.t_pad, p.d), lambda b, h, t, *_: (b, h, 0, 0))
    lane = pl.BlockSpec((None, None, 1, p.tq), lambda b, h, t, *_: (b, h, 0, t))
    const = lambda shape: pl.BlockSpec(shape, lambda b, h, t, *_: (0,) * len(shape))  # noqa: E731
    return row, blk, ctx, lane, const


def _statics(p: M.Plan, causal, window):
    prow = jnp.broadcast_to(jnp.asarray(M.row_positions(p))[:, None], (p.tq, _LANES))
    bm = M.block_mask(p, causal=causal, window=window)
    return prow, jnp.asarray(bm, jnp.int32), jnp.asarray(bm.T, jnp.int32)


def _params(semantics, vmem_limit):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit)


def _forward(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb, kc, vc):
    row, blk, ctx, lane, const = _specs(p)
    prow, bm, _ = _statics(p, causal, window)
    m = p.b * p.hk * p.n_qt
    cost = pl.CostEstimate(flops=4 * m * p.tq * p.d * (p.gb + p.t_pad // 2),
                           transcendentals=m * p.tq * (p.gb + p.t_pad // 2),
                           bytes_accessed=2 * q.size * q.dtype.itemsize + 2 * kc.size * 2)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, scale=scale, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(p.b, p.hk, p.n_qt),
            in_specs=[row, blk, blk, ctx, ctx, const((p.tq, _LANES)), const((p.tq, p.gb))],
            out_specs=[row, lane],
            scratch_shapes=[pltpu.VMEM((p.tq, _LANES), jnp.float32),
                            pltpu.VMEM((p.tq, _LANES), jnp.float32),
                            pltpu.VMEM((p.tq, p.d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((p.b, p.hk, 1, q.shape[2]), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel"), vmem_limit),
        cost_estimate=cost, interpret=interpret,
    )(anchors, ranges, q, kb, vb, kc, vc, prow, bm)
    return out, lse


def _backward(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb, kc,
              vc, o, lse, do):
    row, blk, ctx, lane, const = _specs(p)
    prow, bm, bmt = _statics(p, causal, window)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)[:, :, None, :]
    f32 = jnp.float32
    dq, dkb, dvb, dkc, dvc = pl.pallas_call(
        functools.partial(_bwd_kernel, p=p, scale=scale, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(p.b, p.hk, p.n_qt),
            in_specs=[row, row, lane, lane, blk, blk, ctx, ctx, const((p.tq, _LANES)),
                      const((p.tq, p.gb)), const((p.gb, p.tq))],
            out_specs=[row, blk, blk, ctx, ctx],
            scratch_shapes=[pltpu.VMEM((p.tq, p.d), f32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(kb.shape, f32), jax.ShapeDtypeStruct(vb.shape, f32),
                   jax.ShapeDtypeStruct(kc.shape, f32), jax.ShapeDtypeStruct(vc.shape, f32)],
        compiler_params=_params(("parallel", "parallel", "arbitrary"), vmem_limit),
        interpret=interpret,
    )(anchors, ranges, q, do, lse, delta, kb, vb, kc, vc, prow, bm, bmt)
    return (dq, dkb.astype(kb.dtype), dvb.astype(vb.dtype), dkc.astype(kc.dtype),
            dvc.astype(vc.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _packed(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb, kc, vc):
    return _forward(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb,
                    kc, vc)[0]


def _packed_fwd(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb, kc,
                vc):
    o, lse = _forward(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb,
                      vb, kc, vc)
    return o, (anchors, ranges, q, kb, vb, kc, vc, o, lse)


def _packed_bwd(p, causal, window, scale, interpret, vmem_limit, res, do):
    anchors, ranges, q, kb, vb, kc, vc, o, lse = res
    grads = _backward(p, causal, window, scale, interpret, vmem_limit, anchors, ranges, q, kb, vb,
                      kc, vc, o, lse, do)
    return (None, None, *grads)


_packed.defvjp(_packed_fwd, _packed_bwd)


def plan_for(q_shape, t: int, hk: int, *, q_blocks=None, block_k=None) -> M.Plan:
    """The tiling block_sparse_tpu uses: ~512-row q tiles, 512-key context tiles."""
    return M.make_plan(q_shape, t, hk, q_blocks=q_blocks, block_k=block_k)


def block_sparse_tpu(q, k_ctx, v_ctx, k_blk, v_blk, anchors, *, causal: bool, window: int | None,
                     scale: float, q_blocks: int | None = None, block_k: int | None = None,
                     interpret: bool = False, vmem_limit_bytes: int = 64 << 20):
    """Same contract as model.attention.block_sparse_attention (shapes in its docstring);
    q_blocks / block_k: tile sizes (model.kernels.mask.make_plan)."""
    p = plan_for(q.shape, k_ctx.shape[1], k_ctx.shape[2], q_blocks=q_blocks, block_k=block_k)
    a = M.pad_anchors(anchors, p)
    ranges = M.tile_ranges(a, p, window).reshape(-1)
    out = _packed(p, causal, window, float(scale), interpret, vmem_limit_bytes, a.reshape(-1),
                  ranges, M.pack_q(q, p), M.pack_blk(k_blk, p), M.pack_blk(v_blk, p),
                  M.pack_ctx(k_ctx, p), M.pack_ctx(v_ctx, p))
    return M.unpack_q(out, p)
