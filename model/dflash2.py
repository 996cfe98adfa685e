"""The two DFlash2 additions to the DFlash draft, as Linen submodules of `DFlashDraft`:

- `DynamicConv`: a grouped two-tap dynamic causal convolution along the block axis, one before
  and one after each attention and MLP sublayer of every layer (`attention_conv`, `mlp_conv`).
  out[s] = sum_o (base[o] + delta[s, o, g]) * x[s - o] over taps o < conv_kernel_size, where g is
  the channel's group (conv_group_size channels share a delta) and x[s - o] = 0 before the
  block's first slot: a tap never reaches into the previous block or the context. The deltas of
  both convolutions come from ONE projection of the sublayer's normed input. Params:
  base_kernel [2, taps, H] (input side, output side), kernel_projection.kernel [H, 2*taps*G].
  Identity at init (base tap 0 = 1, the rest and the projection 0): step 0 is DFlash.
- `CandidateSelector`: reranks the unary top-K candidates of each slot with a bilinear term
  <predecessor_codebook[prev] * hidden_projection(h), successor_codebook[cand]> added to the
  unary logit; prev is the token chosen at the previous slot (the anchor for slot 1). Params:
  predecessor_codebook, successor_codebook [V, rank], hidden_projection.kernel [H, rank].

Semantics are the reference's (`dflash==0.1.0` GroupedDynamicCausalConv, CandidateSelector,
DFlash2DraftModel.propose) and speculators 0.9.0's (models/dflash2: identity init, taps reset
at block boundaries, selector candidates); tests/test_dflash2_*.py check both.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import DraftConfig
from model.layers import KERNEL_INIT, Linear


def grouped_dynamic_conv(x, delta, base, group_size: int):
    """x [..., S, H] (S = block slots), delta [..., S, taps, G], base [taps, H] -> [..., S, H].

    Causal along S within the given axis only: callers pass one block per S axis, so taps
    never cross a block boundary."""
    *lead, s, h = x.shape
    taps, groups = base.shape[0], h // group_size
    xg = x.reshape(*lead, s, groups, group_size)
    out = jnp.zeros_like(xg)
    for o in range(taps):
        shifted = xg if o == 0 else jnp.pad(
            xg[..., : s - o, :, :], [(0, 0)] * len(lead) + [(o, 0), (0, 0), (0, 0)])
        coef = (base[o].astype(x.dtype).reshape(groups, group_size)
                + delta[..., o, :, None].astype(x.dtype))
        out = out + coef * shifted
    return out.reshape(x.shape)


def _identity_taps(key, shape, dtype=jnp.float32):
    """base_kernel init: tap 0 = 1, later taps 0 (both convolutions pass x through)."""
    del key
    return jnp.zeros(shape, dtype).at[:, 0].set(1.0)


class DynamicConv(nn.Module):
    """One sublayer's pair of convolutions (input side `prepare`, output side `finish`)."""

    config: DraftConfig

    def setup(self):
        c, d2 = self.config, self.config.dflash2
        self.taps, self.group = d2.conv_kernel_size, d2.conv_group_size
        self.groups = c.hidden_size // self.group
        self.base_kernel = self.param(
            "base_kernel", nn.with_logical_partitioning(_identity_taps, (None, None, "embed")),
            (2, self.taps, c.hidden_size), jnp.float32)
        self.kernel_projection = Linear(2 * self.taps * self.groups, ("embed", None))

    def deltas(self, h):
        """h [..., S, H] (the sublayer's normed input) -> [..., S, 2, taps, G]."""
        return self.kernel_projection(h).reshape(*h.shape[:-1], 2, self.taps, self.groups)

    def prepare(self, h):
        """The sublayer's input, convolved with the input-side taps."""
        return grouped_dynamic_conv(h, self.deltas(h)[..., 0, :, :], self.base_kernel[0],
                                    self.group)

    def finish(self, h, y):
        """The sublayer's output y, convolved with the output-side taps, whose deltas come from
        the same normed input h (recomputed: under jit XLA's CSE shares it with `prepare`)."""
        return grouped_dynamic_conv(y, self.deltas(h)[..., 1, :, :], self.base_kernel[1],
                                    self.group)


class CandidateSelector(nn.Module):
    """Rerank unary top-K candidates with the predecessor x hidden x successor bilinear term."""

    config: DraftConfig

    def setup(self):
        c, d2 = self.config, self.config.dflash2
        shape = (c.vocab_size, d2.selector_rank)
        init = nn.with_logical_partitioning(KERNEL_INIT, ("vocab", "rank"))
        self.predecessor_codebook = self.param("predecessor_codebook", init, shape, jnp.float32)
        self.successor_codebook = self.param("successor_codebook", init, shape, jnp.float32)
        self.hidden_projection = Linear(d2.selector_rank, ("embed", None))
        self.top_k = d2.selector_top_k

    def transition(self, hidden, predecessor_ids, candidate_ids):
        """hidden [..., H], predecessor_ids [...], candidate_ids [..., K] -> [..., K]."""
        proj = self.hidden_projection(hidden)
        prev = jnp.take(self.predecessor_codebook, predecessor_ids, axis=0).astype(proj.dtype)
        succ = jnp.take(self.successor_codebook, candidate_ids, axis=0).astype(proj.dtype)
        return jnp.einsum("...r,...kr->...k", prev * proj, succ)

    def scores(self, unary, hidden, predecessor_ids, candidate_ids):
        """Selector logits of given candidates: their unary logits [..., K] + transition."""
        return unary + self.transition(hidden, predecessor_ids, candidate_ids).astype(unary.dtype)

    def walk(self, hidden, logits, anchor_ids, temperature, uniforms):
        """The proposed path through the top-K candidates of each slot, slot by slot.

        hidden [b, n, H] and logits [b, n, V] of slots 1..n, anchor_ids [b], temperature (scalar;
        <= 0: greedy), uniforms [b, n] in [0, 1) (used when sampling: inverse-CDF draw, as
        pipeline.speculative.loop.sample_from) -> (path [b, n] int32, candidates [b, n, K] int32
        (descending unary), q [b, n, K] f32: the distribution each slot's pick was drawn from,
        softmax(scores / temperature); one-hot at the argmax when greedy)."""
        unary, cands = jax.lax.top_k(logits, self.top_k)
        proj = self.hidden_projection(hidden)
        greedy = temperature <= 0
        t = jnp.where(greedy, 1.0, temperature).astype(jnp.float32)

        def step(prev, xs):
            u, c, p, r = xs  # [b, K], [b, K], [b, rank], [b]
            ctx = jnp.take(self.predecessor_codebook, prev, axis=0).astype(p.dtype) * p
            succ = jnp.take(self.successor_codebook, c, axis=0).astype(p.dtype)
            s = (u + jnp.einsum("br,bkr->bk", ctx, succ).astype(u.dtype)).astype(jnp.float32)
            q = jax.nn.softmax(s / t, axis=-1)
            cdf = jnp.cumsum(q, axis=-1)
            drawn = jnp.sum(cdf <= (r * cdf[:, -1])[:, None], axis=-1)
            best = jnp.argmax(s, axis=-1)
            idx = jnp.minimum(jnp.where(greedy, best, drawn), self.top_k - 1)
            q = jnp.where(greedy, jax.nn.one_hot(best, self.top_k, dtype=q.dtype), q)
            tok = jnp.take_along_axis(c, idx[:, None], axis=1)[:, 0]
            return tok, (tok, q)

        xs = tuple(jnp.moveaxis(a, 1, 0) for a in (unary, cands, proj, uniforms))
        _, (path, q) = jax.lax.scan(step, anchor_ids.astype(cands.dtype), xs)
        return jnp.moveaxis(path, 0, 1), cands, jnp.moveaxis(q, 0, 1)


def predecessor_ids(input_ids, anchors, width: int):
    """Teacher-forced predecessors of slots 1..width: input_ids[anchor + k - 1] ([b, N, width];
    clipped past the end, where nothing is supervised)."""
    t = input_ids.shape[1]
    pos = jnp.minimum(anchors[..., None] + jnp.arange(width), t - 1)
    return jnp.take_along_axis(input_ids, pos.reshape(pos.shape[0], -1), axis=1).reshape(pos.shape)


def init_additions(config: DraftConfig, rng, backbone: dict, dtype=jnp.float32) -> dict:
    """List-form DFlash2 params: the DFlash `backbone` plus identity convolutions (base tap 0 = 1,
    projection 0, as speculators' reset_parameters) and the selector drawn N(0, 0.02) (its
    initializer_range)."""
    d2, h = config.dflash2, config.hidden_size
    taps, groups = d2.conv_kernel_size, h // d2.conv_group_size

    def conv():
        return {"base_kernel": _identity_taps(None, (2, taps, h)).astype(dtype),
                "kernel_projection": {"kernel": jnp.zeros((h, 2 * taps * groups), dtype)}}

    layers = [{**layer, "attention_conv": conv(), "mlp_conv": conv()}
              for layer in backbone["layers"]]
    keys = jax.random.split(rng, 3)
    draw = lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)  # noqa: E731
    vr = (config.vocab_size, d2.selector_rank)
    selector = {"predecessor_codebook": draw(keys[0], vr), "successor_codebook": draw(keys[1], vr),
                "hidden_projection": {"kernel": draw(keys[2], (h, d2.selector_rank))}}
    return {**backbone, "layers": layers, "candidate_selector": selector}
