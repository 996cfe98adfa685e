"""GPT-OSS routed experts: only the top-k experts of each token are computed.

HF `GptOssMLP` semantics: router logits (float32 here), top-k, softmax over the k selected
logits, clamped GLU (gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(1.702 gate)), and
out = sum_k w_k (act_k @ down_e + down_b_e).

How: the N*k (token, expert) pairs are sorted by expert, so each expert's rows are contiguous,
and `jax.lax.ragged_dot` multiplies row group g by expert g's matrix (group sizes from a
bincount). Why ragged_dot: XLA:TPU lowers it to its native grouped matmul (one pass over each
expert's weights, FLOPs = routed rows only, static shapes whatever the routing), where a
per-token gather of expert weights would move k full expert matrices per token and a capacity
dispatch (GShard) either drops tokens or, sized for no drops, is dense again. XLA:CPU has no
grouped matmul: JAX lowers ragged_dot there to a masked dense product (E x the routed FLOPs, the
same function), which is what the CPU tests run.

Runs inside the decoder's shard_map: every "model" shard holds the same tokens and its slice of
every expert's intermediate dim (gate/up pairs stay together: the split is contiguous and even),
so the down projection gives partial sums, combined over k first and then all-reduced once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pipeline.speculative.weights import MODEL, TargetShape


def routed_experts(s: TargetShape, lay: dict, x):
    """x [N, H] float32 (the same on every model shard) -> [N, H] float32 (all-reduced)."""
    n = x.shape[0]
    dt = s.jnp_dtype
    logits = x @ lay["router"].T + lay["router_b"]
    top_v, top_i = jax.lax.top_k(logits, s.top_k)
    weights = jax.nn.softmax(top_v, axis=-1)  # [N, k]
    flat = top_i.reshape(-1)  # pair p = token p // k, its (p % k)-th expert
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    sizes = jnp.zeros((s.experts,), jnp.int32).at[flat].add(1)
    rows = x.astype(dt)[order // s.top_k]  # [N*k, H], grouped by expert
    gate_up = jax.lax.ragged_dot(rows, lay["gate_up"], sizes, preferred_element_type=jnp.float32)
    gate_up = gate_up + lay["gate_up_b"][sorted_experts]
    gate = jnp.minimum(gate_up[:, ::2], s.swiglu_limit)
    up = jnp.clip(gate_up[:, 1::2], -s.swiglu_limit, s.swiglu_limit)
    act = (up + 1.0) * (gate * jax.nn.sigmoid(gate * 1.702))
    out = jax.lax.ragged_dot(act.astype(dt), lay["down"], sizes, preferred_element_type=jnp.float32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out[inverse].reshape(n, s.top_k, -1)  # back to (token, k) order
    out = jax.lax.psum(jnp.einsum("nk,nkh->nh", weights, out), MODEL)
    return out + jnp.einsum("nk,nkh->nh", weights, lay["down_b"][top_i])
