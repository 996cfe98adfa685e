"""Leaf layers of the draft as Linen modules: Linear (Flax kernel [in, out]), RMSNorm, SwiGLU MLP.

Every param carries the logical names of its dimensions (embed, heads, kv, mlp; None =
replicated) through `nn.with_logical_partitioning`; the trainer's rules table maps them to mesh
axes. Weights are cast to the input's dtype at use, so bf16 activations over float32 params
compute in bf16, as the reference does.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_INIT = nn.initializers.normal(0.02)  # the reference's initializer_range


class Linear(nn.Module):
    """x [..., in] @ kernel [in, out] (+ bias [out])."""

    features: int
    axes: tuple  # logical names of the kernel's (in, out) dims; the bias takes the out name
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.with_logical_partitioning(KERNEL_INIT, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.axes[1:]),
                              (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen3RMSNorm over the last dim: normalise in float32, cast back to x's dtype, then scale."""

    eps: float
    axes: tuple = ("embed",)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                           (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * xf.astype(x.dtype)


class MLP(nn.Module):
    """Qwen3MLP: down(silu(gate(x)) * up(x)), width `intermediate_size`."""

    intermediate_size: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        gate = Linear(self.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        up = Linear(self.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        return Linear(x.shape[-1], ("mlp", "embed"), name="down_proj")(jax.nn.silu(gate) * up)
