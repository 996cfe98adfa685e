"""Block-sparse DFlash training attention as a Pallas Triton (GPU) kernel, forward and backward.

Same tiling as the TPU kernel (model.kernels.mask): program (batch, kv head, q tile) holds one q
tile of G blocks x B offsets x R query heads and walks only the context tiles its anchors can see
(dynamic-trip-count loops over [lo, hi), unmasked over [m1, m2)), after its own G*B block keys.
Backward: one fused kernel on the same grid; dq and the block keys' dk/dv per program, the
context's dk/dv added with f32 atomics (q tiles of one kv head run in parallel).
Triton needs power-of-two tiles of at least 16: tq = G*B*R, G*B, block_k and D.

`interpret=True` runs the same kernels on CPU (the tests' proof; CI has no GPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from model.kernels import mask as M

_NEG = float(jnp.finfo(jnp.float32).min)
_NT = (((1,), (1,)), ((), ()))


def _row_state(anchors_ref, prow, bi, t, p: M.Plan, window):
    base = bi * p.n_pad + t * p.g
    a_row = jnp.full(prow.shape, anchors_ref[base], jnp.int32)
    start = jnp.zeros(prow.shape, jnp.int32)
    for g in range(1, p.g):
        sel = prow >= g * p.bs
        a_row = jnp.where(sel, anchors_ref[base + g], a_row)
        start = jnp.where(sel, g * p.bs, start)
    low = None if window is None else a_row + (prow - start) - window + 1
    return a_row[:, None], None if low is None else low[:, None]


def _ctx_mask(shape, start, a_row, low):
    kpos = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = kpos < a_row
    return vis if low is None else vis & (kpos >= low)


def _ranges(ranges_ref, bi, t, p):
    base = (bi * p.n_qt + t) * 4
    return [ranges_ref[base + i] for i in range(4)]


def _loops(lo, m1, m2, hi, body, carry):
    carry = jax.lax.fori_loop(lo, m1, lambda c, x: body(c, x, True), carry)
    carry = jax.lax.fori_loop(m1, m2, lambda c, x: body(c, x, False), carry)
    return jax.lax.fori_loop(m2, hi, lambda c, x: body(c, x, True), carry)


def _fwd_kernel(anchors_ref, ranges_ref, q_ref, kb_ref, vb_ref, kc_ref, vc_ref, prow_ref,
                bmask_ref, o_ref, lse_ref, *, p: M.Plan, scale, window):
    bi, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    s = jax.lax.dot_general(q, kb_ref[...], _NT, preferred_element_type=jnp.float32) * scale
    s = jnp.where(bmask_ref[...] > 0, s, _NEG)
    m = s.max(-1)
    pr = jnp.exp(s - m[:, None])
    acc = jnp.dot(pr.astype(vb_ref.dtype), vb_ref[...], preferred_element_type=jnp.float32)
    a_row, low = _row_state(anchors_ref, prow_ref[...], bi, t, p, window)

    def body(c, carry, masked):
        m, l, acc = carry
        start = c * p.tk
        k = kc_ref[bi, h, pl.ds(start, p.tk), :]
        v = vc_ref[bi, h, pl.ds(start, p.tk), :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_ctx_mask(s.shape, start, a_row, low), s, _NEG)
        m_next = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_next)
        pr = jnp.exp(s - m_next[:, None])
        acc = alpha[:, None] * acc + jnp.dot(pr.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return m_next, alpha * l + pr.sum(-1), acc

    m, l, acc = _loops(*_ranges(ranges_ref, bi, t, p), body, (m, pr.sum(-1), acc))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(anchors_ref, ranges_ref, q_ref, do_ref, lse_ref, dl_ref, kb_ref, vb_ref, kc_ref,
                vc_ref, prow_ref, bmask_ref, dkc_in, dvc_in, dq_ref, dkb_ref, dvb_ref, dkc_ref,
                dvc_ref, *, p: M.Plan, scale, window):
    del dkc_in, dvc_in  # aliased to dkc_ref / dvc_ref (zeros)
    bi, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, do, kb, vb = q_ref[...], do_ref[...], kb_ref[...], vb_ref[...]
    lse, dl = lse_ref[...][:, None], dl_ref[...][:, None]
    s = jax.lax.dot_general(q, kb, _NT, preferred_element_type=jnp.float32) * scale
    pr = jnp.where(bmask_ref[...] > 0, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(do, vb, _NT, preferred_element_type=jnp.float32)
    ds = pr * (dp - dl)
    dq = jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
    dkb_ref[...] = (jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
                    * scale).astype(dkb_ref.dtype)
    dvb_ref[...] = jnp.dot(pr.T.astype(do.dtype), do,
                           preferred_element_type=jnp.float32).astype(dvb_ref.dtype)
    a_row, low = _row_state(anchors_ref, prow_ref[...], bi, t, p, window)

    def body(c, dq, masked):
        start = c * p.tk
        k = kc_ref[bi, h, pl.ds(start, p.tk), :]
        v = vc_ref[bi, h, pl.ds(start, p.tk), :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        pr = jnp.exp(s - lse)
        if masked:
            pr = jnp.where(_ctx_mask(s.shape, start, a_row, low), pr, 0.0)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = pr * (dp - dl)
        rows = (bi, h, pl.ds(start, p.tk), slice(None))
        plt.atomic_add(dkc_ref, rows, jnp.dot(ds.T.astype(q.dtype), q,
                                              preferred_element_type=jnp.float32) * scale)
        plt.atomic_add(dvc_ref, rows, jnp.dot(pr.T.astype(do.dtype), do,
                                              preferred_element_type=jnp.float32))
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _loops(*_ranges(ranges_ref, bi, t, p), body, dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(p: M.Plan):
    row = pl.BlockSpec((None, None, p.tq, p.d), lambda b, h, t: (b, h, t, 0))
    blk = pl.BlockSpec((None, None, p.gb, p.d), lambda b, h, t: (b, h, t, 0))
    lse = pl.BlockSpec((None, None, p.tq), lambda b, h, t: (b, h, t))
    const = lambda shape: pl.BlockSpec(shape, lambda b, h, t: (0,) * len(shape))  # noqa: E731
    return row, blk, lse, const, pl.BlockSpec()  # the last: the whole array


def _statics(p: M.Plan, causal, window):
    bm = M.block_mask(p, causal=causal, window=window)
    return jnp.asarray(M.row_positions(p)), jnp.asarray(bm, jnp.int32)


def _forward(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc):
    row, blk, lse, const, whole = _specs(p)
    prow, bm = _statics(p, causal, window)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, scale=scale, window=window),
        grid=(p.b, p.hk, p.n_qt),
        in_specs=[whole, whole, row, blk, blk, whole, whole, const((p.tq,)), const((p.tq, p.gb))],
        out_specs=[row, lse],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
    )(anchors, ranges, q, kb, vb, kc, vc, prow, bm)


def _backward(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc, o, lse,
              do):
    row, blk, lse_spec, const, whole = _specs(p)
    prow, bm = _statics(p, causal, window)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)
    f32 = jnp.float32
    zeros = jnp.zeros(kc.shape, f32)
    dq, dkb, dvb, dkc, dvc = pl.pallas_call(
        functools.partial(_bwd_kernel, p=p, scale=scale, window=window),
        grid=(p.b, p.hk, p.n_qt),
        in_specs=[whole, whole, row, row, lse_spec, lse_spec, blk, blk, whole, whole,
                  const((p.tq,)), const((p.tq, p.gb)), whole, whole],
        out_specs=[row, blk, blk, whole, whole],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(kb.shape, f32), jax.ShapeDtypeStruct(vb.shape, f32),
                   jax.ShapeDtypeStruct(kc.shape, f32), jax.ShapeDtypeStruct(vc.shape, f32)],
        input_output_aliases={12: 3, 13: 4},
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
    )(anchors, ranges, q, do, lse, delta, kb, vb, kc, vc, prow, bm, zeros, zeros)
    return (dq, dkb.astype(kb.dtype), dvb.astype(vb.dtype), dkc.astype(kc.dtype),
            dvc.astype(vc.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _packed(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc):
    return _forward(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc)[0]


def _packed_fwd(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc):
    o, lse = _forward(p, causal, window, scale, interpret, anchors, ranges, q, kb, vb, kc, vc)
    return o, (anchors, ranges, q, kb, vb, kc, vc, o, lse)


def _packed_bwd(p, causal, window, scale, interpret, res, do):
    anchors, ranges, q, kb, vb, kc, vc, o, lse = res
    return (None, None, *_backward(p, causal, window, scale, interpret, anchors, ranges, q, kb,
                                   vb, kc, vc, o, lse, do))


_packed.defvjp(_packed_fwd, _packed_bwd)


def _pow2(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def plan_for(q_shape, t: int, hk: int, *, q_blocks=None, block_k=None) -> M.Plan:
    """The tiling block_sparse_gpu uses: ~128-row q tiles (power of two), 64-key context tiles."""
    return M.make_plan(q_shape, t, hk, q_blocks=q_blocks, block_k=block_k or 64, q_rows=128,
                       lane=16, pow2=True)


def block_sparse_gpu(q, k_ctx, v_ctx, k_blk, v_blk, anchors, *, causal: bool, window: int | None,
                     scale: float, q_blocks: int | None = None, block_k: int | None = None,
                     interpret: bool = False):
    """Same contract as model.attention.block_sparse_attention; q_blocks / block_k: tiles."""
    p = plan_for(q.shape, k_ctx.shape[1], k_ctx.shape[2], q_blocks=q_blocks, block_k=block_k)
    if not all(_pow2(x) for x in (p.tq, p.gb, p.tk, p.d)):
        raise ValueError(f"pallas_gpu needs power-of-two tiles >= 16: q rows {p.tq} "
                         f"(blocks {p.g} x B {p.bs} x heads/kv {p.r}), block keys {p.gb}, "
                         f"block_k {p.tk}, head_dim {p.d}")
    a = M.pad_anchors(anchors, p)
    out = _packed(p, causal, window, float(scale), interpret, a.reshape(-1),
                  M.tile_ranges(a, p, window).reshape(-1), M.pack_q(q, p), M.pack_blk(k_blk, p),
                  M.pack_blk(v_blk, p), M.pack_ctx(k_ctx, p), M.pack_ctx(v_ctx, p))
    return M.unpack_q(out, p)
