"""Feature sums: a per-record checksum of the features that the accelerator can compute.

The dump computes them on the device from the features it is about to transfer; the trainer
recomputes them on the device inside its step from the features it is about to train on, and the
loop stops before anything trained on a mismatching record is saved, evaluated or exported. The
check is end to end (device -> host -> storage -> loader -> device) and costs the host nothing:
a full-content hash on the host (the loader's xxh3 check) costs 10-20% of a 2-core host's read
throughput whatever it is scheduled (docs/BENCHMARKS.md section 2), while the same bytes cost a
TPU chip a few microseconds of HBM reads.

Definition (v1), for one record's features F [T, K*H] bfloat16, words x_i = the bf16 bit patterns
as uint16, i the row-major index t * K*H + f:

    sum_k = SUM_i w_k(i) * x_i  mod 2**32,   w_k(i) = fmix32(i XOR SEEDS[k]) | 1,   k = 0, 1

fmix32 is MurmurHash3's 32-bit finaliser (pseudo-random, invertible). Every weight is odd, so a
change confined to one word always changes both sums; a random corruption passes one sum with
probability about 2**-32. Sums mod 2**32 are associative and commutative: any reduction order
(XLA's, a sharded psum, numpy's) gives the same bits.

`feature_sums_np` is the host implementation (the writer's, when a record comes without sums:
tests, benches, the bench's synthetic caches); `feature_sums` is the jax one (the dump, the step).
They are written independently and tested against each other. No module-level jax import: the
cache readers import this module.
"""
from __future__ import annotations

import numpy as np

VERSION = 1
SEEDS = (0x9E3779B9, 0x7F4A7C15)
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35
_ROWS_PER_BLOCK = 64  # numpy: weights for 64 rows at a time (T*F weights would be 118 MB at 20b)


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(_C1)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(_C2)
    return h ^ (h >> np.uint32(16))


def feature_sums_np(features: np.ndarray) -> np.ndarray:
    """[T, F] (or [B, T, F]) bfloat16 features -> [2] (or [B, 2]) uint32 sums."""
    feats = np.asarray(features)
    if feats.ndim == 3:
        return np.stack([feature_sums_np(f) for f in feats]) if len(feats) else \
            np.zeros((0, 2), np.uint32)
    if feats.ndim != 2 or feats.dtype.itemsize != 2:
        raise ValueError(f"feature sums take [T, F] 16-bit features, got {feats.shape} "
                         f"{feats.dtype}")
    words = np.ascontiguousarray(feats).view(np.uint16)
    rows, width = words.shape
    out = np.zeros(2, np.uint32)
    with np.errstate(over="ignore"):
        for lo in range(0, rows, _ROWS_PER_BLOCK):
            block = words[lo:lo + _ROWS_PER_BLOCK].astype(np.uint32)
            index = (np.arange(lo * width, (lo + len(block)) * width, dtype=np.uint64)
                     .astype(np.uint32).reshape(block.shape))
            for k, seed in enumerate(SEEDS):
                w = _fmix32_np(index ^ np.uint32(seed)) | np.uint32(1)
                out[k] += np.sum(w * block, dtype=np.uint32)
    return out


def feature_sums(features):
    """jax: [B, T, F] bfloat16 features -> [B, 2] uint32 sums (traceable, any sharding of B)."""
    import jax
    import jax.numpy as jnp

    b, t, f = features.shape
    words = jax.lax.bitcast_convert_type(features.astype(jnp.bfloat16), jnp.uint16)
    words = words.astype(jnp.uint32)
    index = (jax.lax.broadcasted_iota(jnp.uint32, (t, f), 0) * jnp.uint32(f)
             + jax.lax.broadcasted_iota(jnp.uint32, (t, f), 1))

    def fmix32(h):
        h = h ^ (h >> 16)
        h = h * jnp.uint32(_C1)
        h = h ^ (h >> 13)
        h = h * jnp.uint32(_C2)
        return h ^ (h >> 16)

    sums = [jnp.sum(words * (fmix32(index ^ jnp.uint32(seed)) | jnp.uint32(1))[None],
                    axis=(1, 2), dtype=jnp.uint32) for seed in SEEDS]
    return jnp.stack(sums, axis=-1)
