"""MXFP4 expert weights (the published gpt-oss checkpoints) dequantized exactly.

Layout (as OpenAI publishes it and transformers' `integrations/mxfp4.py` reads it): per expert
projection `<proj>_blocks` uint8 [E, rows, G, 16] and `<proj>_scales` uint8 [E, rows, G]; each
byte holds two FP4 (e2m1) codes, the low nibble first; a group of 32 values along the input dim
shares one power-of-two scale 2^(scale - 127). rows is the projection's output dim, G*32 its
input dim, so the dequantized [E, rows, in] is transposed to the HF parameter layout [E, in, rows]
(gate_up_proj [E, H, 2I], down_proj [E, I, H]).

Every FP4 value times a power of two in bf16's exponent range is exact in bf16 (and f32), so the
result does not depend on the dtype it is computed in; transformers computes it in bf16 and the
tests hold ours bitwise equal to its `convert_moe_packed_tensors`.
"""
from __future__ import annotations

import numpy as np

# e2m1 code -> value: sign bit 3, then exponent/mantissa
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

QUANTIZED_PROJECTIONS = ("gate_up_proj", "down_proj")


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [E, rows, G, 16], scales uint8 [E, rows, G] -> float32 [E, G*32, rows]."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.dtype}{list(blocks.shape)} and scales "
                         f"{scales.dtype}{list(scales.shape)} do not match the gpt-oss layout")
    values = np.empty(blocks.shape + (2,), np.float32)
    values[..., 0] = FP4_VALUES[blocks & 0x0F]
    values[..., 1] = FP4_VALUES[blocks >> 4]
    values = values.reshape(scales.shape + (32,))
    np.ldexp(values, scales.astype(np.int32)[..., None] - 127, out=values)
    e, rows = scales.shape[:2]
    return values.reshape(e, rows, -1).transpose(0, 2, 1)


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF-layout [E, in, rows] -> (blocks, scales) in the gpt-oss layout; round to nearest FP4
    code after scaling each group of 32 by 2^(floor(log2(max|w|)) - 2). Only for writing test
    snapshots: whatever it rounds, `dequantize` of its output is what a loader must reproduce."""
    w = np.asarray(weight, np.float32).transpose(0, 2, 1)  # [E, rows, in]
    e, rows, n_in = w.shape
    groups = w.reshape(e, rows, n_in // 32, 32)
    amax = np.abs(groups).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, 0).astype(np.int32)
    scales = np.clip(exp + 127, 0, 255).astype(np.uint8)
    scaled = groups / np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)
    codes = codes.reshape(e, rows, n_in // 32, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
    return blocks, scales
