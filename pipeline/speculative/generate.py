"""Batched, KV-cached generation with the GPT-OSS target: greedy or sampled, one jitted program.

The math is `pipeline.speculative.target.forward_rows`, the one decoder forward (the speculative
harness's `CachedTarget` runs it on one row; the tests hold batched rows token-identical to each
row alone and to HF torch's generate). Prompts
are left-padded to a common length, so every row writes the same cache slot at every step (one
in-place dynamic_update_slice per cache; per-row scatters cost half the decode step), while each
row keeps its own RoPE positions (slot - first[r]) and never reads its padding slots: a row sees
the same keys at the same positions as it would alone. The caches are per-layer buffers carried
through the decode loop; the first version vmapped `forward`, which restacked (copied) every
cache at every step and ran ~2.5x slower at batch 64.
Only the routed experts are computed (pipeline.speculative.moe), the weights and caches are in
the decoder's dtype (bf16 on an accelerator by default) and sharded over its mesh (batch rows
over "data", heads / expert width / vocab over "model"). The prompt is prefilled in chunks of
`prefill_chunk` columns (a lax.fori_loop of cached steps, the same math as one step): a whole
[batch, prompt] prefill would hold [batch, heads, prompt, cache] attention scores at once
(68 GB per v5e chip for gpt-oss-20b at batch 256, 2048-token prompts).

A row that has stopped keeps running (its output is cut on the host): its slots are its own, so
it disturbs no other row, and the loop never runs past max_new_tokens, so no write leaves the
cache.

The decode loop is a `lax.while_loop` inside the same jit (one dispatch per batch, exiting when
every row has stopped). Sampling draws token t of sequence i with the key
fold_in(fold_in(PRNGKey(seed), i), t): the draw depends on (seed, sequence index, step) only,
never on which other sequences share the batch, so a resumed run reproduces it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.speculative import target as tc
from pipeline.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are picked (hashable: static in the jitted program)."""
    max_new_tokens: int = 512  # per sequence, the stop token included
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability >= top_p
    seed: int = 0  # sampled decoding: token t of sequence i uses fold_in(seed, i, t)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")


def pick(sampling: SamplingConfig, logits, key):
    """One token from logits [V] (float32): argmax, or a temperature / top-p draw with `key`."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits).astype(jnp.int32)
    z = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        order = jnp.argsort(-z)
        probs = jax.nn.softmax(z[order])
        before = jnp.cumsum(probs) - probs  # mass of strictly more likely tokens
        keep_sorted = before < sampling.top_p  # the top token is always kept
        z = jnp.where(jnp.zeros_like(keep_sorted).at[order].set(keep_sorted), z, -jnp.inf)
    return jax.random.categorical(key, z).astype(jnp.int32)


def row_keys(sampling: SamplingConfig, seq_index):
    """Per-row sampling keys: fold_in(PRNGKey(seed), sequence index)."""
    base = jax.random.PRNGKey(sampling.seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(seq_index)


def pick_rows(sampling: SamplingConfig, logits, keys, t):
    """Token t of every row from logits [b, V]: row r draws with fold_in(keys[r], t)."""
    return jax.vmap(lambda lg, k: pick(sampling, lg, jax.random.fold_in(k, t)))(logits, keys)


def prefill_step(shape: tc.TargetShape, params, cache, cols, slot, first):
    """Prompt columns cols [b, c] at the shared slots slot.. -> (last column's hidden [b, H],
    cache). One chunk of the prefill: what `_generate` loops over and tools.tpu_compile compiles."""
    hidden, _, cache = tc.forward_rows(shape, params, cache, cols, slot, first)
    return hidden[:, -1], cache


def decode_step(shape: tc.TargetShape, sampling: SamplingConfig, params, cache, tok, t, slot,
                first, keys):
    """Token t of every row from the previous tokens tok [b] written at `slot` -> (new tokens
    [b], cache): the body of `_generate`'s decode loop, and what tools.tpu_compile compiles."""
    hidden, _, cache = tc.forward_rows(shape, params, cache, tok[:, None], slot, first)
    return pick_rows(sampling, tc.logits(params, hidden[:, 0]), keys, t), cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(shape: tc.TargetShape, sampling: SamplingConfig, cache_len: int, chunk: int,
              params, prompts, lengths, seq_index, stop_ids):
    """prompts [B, P] int32 (left-padded: row r's prompt fills the last lengths[r] columns; P a
    multiple of chunk), lengths [B], seq_index [B] (sampling keys), stop_ids [n] ->
    tokens [B, max_new_tokens] (after a row's stop token: the stop token repeated)."""
    b, p = prompts.shape
    first = (p - lengths).astype(jnp.int32)
    keys = row_keys(sampling, seq_index)

    def prefill(c, carry):
        cols = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        return prefill_step(shape, params, carry[0], cols, c * chunk, first)[::-1]

    carry = (tc.new_row_cache(shape, b, cache_len), jnp.zeros((b, shape.hidden), jnp.float32))
    cache, last = jax.lax.fori_loop(0, p // chunk, prefill, carry)
    tok = pick_rows(sampling, tc.logits(params, last), keys, 0)
    out = jnp.zeros((b, sampling.max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)

    def cond(state):
        t, _, _, done, _ = state
        return (t < sampling.max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, cache, done, out = state
        new, cache = decode_step(shape, sampling, params, cache, tok, t, p + t - 1, first, keys)
        new = jnp.where(done, tok, new)  # a stopped row repeats its stop token (cut on the host)
        out = out.at[:, t].set(new)
        return t + 1, new, cache, done | jnp.isin(new, stop_ids), out

    state = (jnp.int32(1), tok, cache, done, out)
    return jax.lax.while_loop(cond, body, state)[-1]


def prefill_chunk(batch_size: int, prompt_bucket: int, prefill_tokens: int) -> int:
    """Prompt columns per prefill step: the largest power of two <= prefill_tokens / batch_size,
    at most prompt_bucket (a power of two, so the chunk divides every padded prompt length)."""
    chunk = 1
    while chunk * 2 <= max(1, prefill_tokens // batch_size) and chunk * 2 <= prompt_bucket:
        chunk *= 2
    return chunk


class BatchGenerator:
    """generate(prompts, indices) -> generated token lists, batch by batch, one compile per
    (batch size, prompt bucket)."""

    def __init__(self, shape: tc.TargetShape, params, *, stop_ids, sampling: SamplingConfig,
                 batch_size: int = 64, prompt_bucket: int = 64, prefill_tokens: int = 8192):
        sampling.validate()
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        if prompt_bucket & (prompt_bucket - 1):
            raise ValueError(f"prompt_bucket must be a power of two, got {prompt_bucket}")
        if batch_size % shape.data_shards:
            raise UserError(f"--batch-size {batch_size} is not a multiple of the mesh's data axis "
                            f"({shape.data_shards})")
        self.shape, self.params, self.sampling = shape, params, sampling
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.batch_size, self.prompt_bucket = batch_size, prompt_bucket
        self.prefill_chunk = prefill_chunk(batch_size, prompt_bucket, prefill_tokens)

    @classmethod
    def from_snapshot(cls, path, *, dtype: str = "auto", devices=None, model_shards=None,
                      **kw) -> "BatchGenerator":
        """Load the snapshot onto a mesh over `devices` (default: every accelerator, one CPU
        device; weights.decoder_mesh)."""
        from pipeline.speculative import weights

        mesh = weights.decoder_mesh(list(devices or weights.default_devices()),
                                    tc.load_hf_config(path), model_shards)
        # features unused: one layer, the cheapest
        shape, params, _ = tc.load_target(path, (0,), dtype=dtype, mesh=mesh)
        return cls(shape, params, **kw)

    def generate(self, prompts: list[list[int]], indices: list[int]) -> list[list[int]]:
        """New tokens of each prompt, cut after its first stop token. `indices` are the global
        sequence numbers that seed sampling; batches are padded to batch_size rows."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            out.extend(self._batch(prompts[s:s + self.batch_size], indices[s:s + self.batch_size]))
        return out

    def _batch(self, prompts, indices):
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: nothing to continue")
        b, n_max = self.batch_size, max(len(p) for p in prompts)
        pad_len = tc.bucket(n_max, self.prompt_bucket)
        ids = np.zeros((b, pad_len), np.int32)
        lengths = np.ones(b, np.int32)  # padding rows: a one-token prompt, result dropped
        index = np.zeros(b, np.int32)
        for r, (p, i) in enumerate(zip(prompts, indices)):
            ids[r, pad_len - len(p):], lengths[r], index[r] = p, len(p), i
        cache_len = tc.bucket(pad_len + self.sampling.max_new_tokens, self.prompt_bucket)
        stop = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
        toks = np.asarray(_generate(self.shape, self.sampling, cache_len, self.prefill_chunk, self.params,
                                    jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(index), stop))
        result = []
        for r in range(len(prompts)):
            row = toks[r].tolist()
            hit = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
            result.append(row if hit is None else row[:hit + 1])
        return result
