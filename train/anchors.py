"""Random anchors per sequence (host side) and the block labels they imply (device side).

Rule (paper App. A): anchors are drawn uniformly, without replacement, among positions t where
loss_mask[t] and loss_mask[t+1] hold (so t+1 < T: an anchor never sits on the last token), a
fixed number per sequence, capped by how many such positions exist; re-drawn every epoch. The draw
is a pure function of (seed, epoch, sequence index), so a resumed run draws the same anchors.
Slots past the sequence end or on unsupervised tokens get no loss.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def valid_anchor_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Positions t with loss_mask[t] and loss_mask[t+1] (int64, ascending)."""
    m = np.asarray(loss_mask).astype(bool)
    return np.flatnonzero(m[:-1] & m[1:])


def draw_anchors(loss_mask: np.ndarray, num_anchors: int, *, seed: int, epoch: int,
                 index: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (anchors int32 [num_anchors], valid bool [num_anchors]).

    Sorted valid anchors first; when fewer than num_anchors positions qualify, the rest are padding
    (anchor 0, valid False) so every sequence has the same static shape.
    """
    candidates = valid_anchor_positions(loss_mask)
    rng = np.random.default_rng([seed, epoch, index])
    k = min(num_anchors, candidates.size)
    chosen = np.sort(rng.choice(candidates, size=k, replace=False)) if k else candidates[:0]
    anchors = np.zeros(num_anchors, np.int32)
    valid = np.zeros(num_anchors, bool)
    anchors[:k] = chosen
    valid[:k] = True
    return anchors, valid


def block_labels(input_ids: jnp.ndarray, loss_mask: jnp.ndarray, anchors: jnp.ndarray,
                 anchor_valid: jnp.ndarray, block_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Targets of slots 0..B-1: (labels int32 [b, N, B], supervised bool [b, N, B]).

    Slot k's target is input_ids[anchor + k]; it is supervised when the anchor is real, k >= 1,
    anchor + k < T and loss_mask[anchor + k]. Slot 0 (the anchor itself) is never supervised.
    """
    seq_len = input_ids.shape[1]
    pos = anchors[..., None] + jnp.arange(block_size, dtype=anchors.dtype)  # [b, N, B]
    inside = pos < seq_len
    flat = jnp.minimum(pos, seq_len - 1).reshape(pos.shape[0], -1)
    labels = jnp.take_along_axis(input_ids, flat, axis=1).reshape(pos.shape)
    sup = jnp.take_along_axis(loss_mask, flat, axis=1).reshape(pos.shape).astype(bool)
    slot = jnp.arange(block_size) >= 1
    supervised = sup & inside & slot & anchor_valid[..., None].astype(bool)
    return labels.astype(jnp.int32), supervised
