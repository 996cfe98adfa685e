"""Tiling of the block-sparse training mask, shared by the Pallas kernels.

Queries of one kv head are packed row-major as (block, offset in block, query head of the group):
a q tile is G whole blocks, G*B*R rows (R = Hq/Hk query heads share one kv head, so each K/V tile
loaded serves all R heads). Context keys are cut into tiles of `block_k` positions. Block n sees
context positions k with k < a_n (and k >= a_n + i - window + 1 on sliding layers, i the query's
offset in its block): over a q tile the visible context is the tile range [lo, hi), of which the
tiles [m1, m2) are visible to every row (no mask needed); the rest are masked per element. With
sorted anchors (train.anchors) the ranges follow the staircase, so the work follows the visible
mask: sum over tiles of (hi - lo) * block_k keys instead of T + N*B per query. Unsorted anchors
are still exact, only slower. Each q tile also attends its own G*B block keys under a static
block-diagonal mask.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
    b: int
    n: int  # blocks
    bs: int  # block size B
    hq: int
    hk: int
    d: int
    t: int  # context length
    g: int  # blocks per q tile
    tk: int  # context keys per tile
    n_pad: int
    t_pad: int

    @property
    def r(self) -> int:
        return self.hq // self.hk

    @property
    def tq(self) -> int:  # rows of a q tile
        return self.g * self.bs * self.r

    @property
    def gb(self) -> int:  # block keys of a q tile
        return self.g * self.bs

    @property
    def n_qt(self) -> int:
        return self.n_pad // self.g

    @property
    def n_kt(self) -> int:
        return self.t_pad // self.tk


def make_plan(q_shape, t: int, hk: int, *, q_blocks: int | None = None,
              block_k: int | None = None, q_rows: int = 512, lane: int = 128,
              pow2: bool = False) -> Plan:
    """q_blocks: blocks per q tile (default: ~q_rows rows); block_k: context keys per tile
    (default 512, or T rounded up to `lane` when shorter); pow2: a power-of-two block count
    (Triton)."""
    b, n, bs, hq, d = q_shape
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} kv heads")
    r = hq // hk
    g = q_blocks or max(1, q_rows // (bs * r))
    g = min(g, n)
    if pow2:
        g = 1 << (g - 1).bit_length()
    while (g * bs * r) % 8 or (g * bs) % 8:  # sublane-aligned q and block-key tiles
        g += 1
    tk = block_k or min(512, -(-t // lane) * lane)
    if tk % 8:
        raise ValueError(f"block_k={tk} is not a multiple of 8")
    return Plan(b=b, n=n, bs=bs, hq=hq, hk=hk, d=d, t=t, g=g, tk=tk,
                n_pad=-(-n // g) * g, t_pad=max(1, -(-t // tk)) * tk)


def pack_q(x, p: Plan):
    """[b, N, B, Hq, D] -> [b, Hk, N_pad*B*R, D] (rows: block, offset, head of the group)."""
    x = jnp.pad(x, [(0, 0), (0, p.n_pad - p.n), (0, 0), (0, 0), (0, 0)])
    x = x.reshape(p.b, p.n_pad, p.bs, p.hk, p.r, p.d).transpose(0, 3, 1, 2, 4, 5)
    return x.reshape(p.b, p.hk, p.n_pad * p.bs * p.r, p.d)


def unpack_q(x, p: Plan):
    x = x.reshape(p.b, p.hk, p.n_pad, p.bs, p.r, p.d).transpose(0, 2, 3, 1, 4, 5)
    return x.reshape(p.b, p.n_pad, p.bs, p.hq, p.d)[:, :p.n]


def pack_blk(x, p: Plan):
    """[b, N, B, Hk, D] -> [b, Hk, N_pad*B, D]."""
    x = jnp.pad(x, [(0, 0), (0, p.n_pad - p.n), (0, 0), (0, 0), (0, 0)])
    return x.transpose(0, 3, 1, 2, 4).reshape(p.b, p.hk, p.n_pad * p.bs, p.d)


def unpack_blk(x, p: Plan):
    x = x.reshape(p.b, p.hk, p.n_pad, p.bs, p.d).transpose(0, 2, 3, 1, 4)
    return x[:, :p.n]


def pack_ctx(x, p: Plan):
    """[b, T, Hk, D] -> [b, Hk, T_pad, D]; padded keys sit at positions >= T >= every anchor,
    so they are never visible."""
    return jnp.pad(x, [(0, 0), (0, p.t_pad - p.t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)


def unpack_ctx(x, p: Plan):
    return x.transpose(0, 2, 1, 3)[:, :p.t]


def pad_anchors(anchors, p: Plan):
    """[b, N] -> [b, N_pad] int32; padding blocks get anchor 0 (they see only themselves)."""
    return jnp.pad(anchors.astype(jnp.int32), [(0, 0), (0, p.n_pad - p.n)])


def tile_ranges(anchors_pad, p: Plan, window: int | None):
    """[b, n_qt, 4] int32 (lo, m1, m2, hi): context tiles [lo, hi) hold every key any row of the q
    tile sees; [m1, m2) are seen whole by every row (computed without a mask)."""
    a = jnp.clip(anchors_pad, 0, p.t).reshape(p.b, p.n_qt, p.g)
    amin, amax = a.min(-1), a.max(-1)
    tk = p.tk
    hi = -(-amax // tk)
    full_hi = amin // tk
    if window is None:
        lo = jnp.zeros_like(amin)
        full_lo = lo
    else:  # rows see k >= a + i - window + 1, i in 0..B-1
        lo = jnp.maximum(amin - window + 1, 0) // tk
        full_lo = -(-jnp.maximum(amax + p.bs - window, 0) // tk)
    lo = jnp.minimum(lo, hi)
    m1 = jnp.clip(full_lo, lo, hi)
    m2 = jnp.clip(full_hi, m1, hi)
    return jnp.stack([lo, m1, m2, hi], -1).astype(jnp.int32)


def row_positions(p: Plan) -> np.ndarray:
    """[tq] int32: position of each q-tile row inside the tile's blocks, g*B + i."""
    return np.repeat(np.arange(p.gb, dtype=np.int32), p.r)


def block_mask(p: Plan, *, causal: bool, window: int | None) -> np.ndarray:
    """[tq, G*B] bool: row (g, i, r) sees block key (g', j) iff g == g' and j is visible from i
    (model.attention.visible on offsets within the block)."""
    pos = row_positions(p)
    g_q, i_q = pos // p.bs, pos % p.bs
    g_k, j = np.arange(p.gb) // p.bs, np.arange(p.gb) % p.bs
    vis = g_q[:, None] == g_k[None, :]
    if causal:
        vis &= j[None, :] <= i_q[:, None]
    if window is not None:
        vis &= i_q[:, None] - j[None, :] < window
        if not causal:
            vis &= j[None, :] - i_q[:, None] < window
    return vis


def visible_tile_count(anchors, p: Plan, window: int | None) -> int:
    """Context tiles the kernel computes for these anchors (for FLOP estimates), summed over
    batch rows and q tiles (each q tile also computes one G*B-key block tile)."""
    r = np.asarray(tile_ranges(pad_anchors(jnp.asarray(anchors), p), p, window))
    return int((r[..., 3] - r[..., 0]).sum())
