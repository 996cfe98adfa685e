"""The teacher: GPT-OSS loaded through EasyDeL from an HF snapshot, made faithful to HF torch.

    t = Teacher.from_pretrained("tiny", dtype=jnp.float32)
    feats = t.features(input_ids, attention_mask, layer_ids=(1, 6, 11))   # [b, T, 3*H]

Layer id i is "output of decoder layer i" = HF `hidden_states[i + 1]` (the reference's sense).
EasyDeL's own `hidden_states[i]` is the INPUT of layer i (it returns L entries: the embedding and
the outputs of layers 0..L-2); the last layer's entry is HF's final-normed state, as in HF.
The forward is one jitted function over the split nnx module (graphdef closed over, state as an
argument), run inside the model's mesh; jax.jit compiles it once per (batch, length, layer ids).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from pipeline.teacher import fixes as easydel_fixes
from pipeline.teacher import jax_setup, sharding, snapshot_check
from pipeline.teacher.attention import resolve_attention, run_length
from pipeline.errors import UserError
from pipeline.teacher.snapshot import DEFAULT_MODEL, check_weights, read_config, resolve_model


def _import_easydel():
    # ejkernel reads this at import: without it every grouped-matmul compile first tries to
    # autotune (and on CPU prints a traceback per failing candidate).
    os.environ.setdefault("EJKERNEL_AUTOTUNE_POLICY", "heuristics")
    import easydel

    return easydel


def load_easydel_model(path, *, dtype, sharding_axis_dims, attn_mechanism="vanilla",
                       fixes=easydel_fixes.ALL_FIXES, dense_experts=False):
    """EasyDeL GptOssForCausalLM from an HF snapshot (from_torch=True), with our fixes applied,
    its weights placed by pipeline.teacher.sharding.partition_rules (experts sharded over the
    expert-parallel group) as they load. dense_experts: EasyDeL's dense MoE path (CPU, where
    the fused expert-parallel path cannot run on an fsdp/ep mesh)."""
    ed = _import_easydel()
    fixes = easydel_fixes.check_fixes(fixes)
    # attn_dtype defaults to bfloat16 in EasyDeL whatever the model dtype.
    config_kwargs = {"attn_mechanism": attn_mechanism, "attn_dtype": dtype,
                     "attn_softmax_dtype": jnp.float32}
    ed_config = ed.AutoEasyDeLConfig.from_pretrained(str(path))
    ed_config.add_basic_configurations(sharding_axis_dims=tuple(sharding_axis_dims),
                                       **config_kwargs)
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        str(path), from_torch=True, dtype=dtype, param_dtype=dtype,
        precision=jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None,
        sharding_axis_dims=tuple(sharding_axis_dims), verbose=False,
        partition_rules=sharding.partition_rules(ed_config, dtype),
        config_kwargs=config_kwargs, **easydel_fixes.load_kwargs(dtype, fixes))
    easydel_fixes.apply_fixes(model, fixes, dtype)
    if dense_experts:
        sharding.use_dense_experts(model)
    return model


def _forward(graphdef, state, input_ids, attention_mask, *, layer_ids, logits_at):
    """(features [b, T, K*H] or None, logits [b, T, V] / [b, V] (last valid token) or None)."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                output_hidden_states=bool(layer_ids), apply_lm_head=False)
    features = None
    if layer_ids:
        outputs = tuple(out.hidden_states[1:]) + (out.last_hidden_state,)  # outputs[i] = layer i
        features = jnp.concatenate([outputs[i] for i in layer_ids], axis=-1)
    logits = None
    if logits_at == "all":
        logits = model.apply_lm_head(out.last_hidden_state)
    elif logits_at == "last":
        last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
        hidden = jnp.take_along_axis(out.last_hidden_state, last[:, None, None], axis=1)
        logits = model.apply_lm_head(hidden)[:, 0]
    return features, logits


class Teacher:
    """A loaded GPT-OSS teacher. Build with `Teacher.from_pretrained`."""

    def __init__(self, model, *, path, dtype, fixes):
        from flax import nnx

        self.attention = str(model.config.attn_mechanism)  # EasyDeL's mechanism, e.g. blocksparse
        # blocksparse falls back to vanilla unless T is a multiple of both block sizes
        self.attention_block = math.lcm(int(getattr(model.config, "blocksize_q", 512) or 1),
                                        int(getattr(model.config, "blocksize_k", 512) or 1))
        self.path = Path(path)
        self.dtype = jnp.dtype(dtype)
        self.fixes = frozenset(fixes)
        self.mesh = model.mesh
        self._model = model
        self.config = json.loads((self.path / "config.json").read_text())  # the HF config
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self._graphdef, self._state = nnx.split(model)
        self._jit = jax.jit(functools.partial(_forward, self._graphdef),
                            static_argnames=("layer_ids", "logits_at"))

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype=jnp.bfloat16,
                        sharding_axis_dims=None, attention: str = "auto",
                        fixes=None, compilation_cache=None,
                        dense_experts: bool = False) -> "Teacher":
        """Load `model` ("tiny", snapshot dir or cached repo id) on all devices present.

        sharding_axis_dims: EasyDeL mesh sizes (dp, fsdp, ep, tp, sp); None = sized to the devices
        (sharding.default_axis_dims). attention: auto (blocksparse on TPU, vanilla on CPU:
        pipeline.teacher.attention), blocksparse or vanilla. fixes: names from
        easydel_fixes.FIX_NAMES, None = all. compilation_cache: directory or "off"; None =
        $DFLASH_JAX_CACHE or /dev/shm/dflash/jax_cache. dense_experts: EasyDeL's dense MoE path
        (sharding.use_dense_experts), which lets a CPU mesh shard the experts over fsdp.
        """
        path = resolve_model(model)
        hf_config = read_config(path)  # JSON, GPT-OSS, sizes: one UserError line otherwise
        check_weights(path)  # safetensors only: no pickle is ever loaded
        _import_easydel()
        jax_setup.enable_compilation_cache(compilation_cache)
        devices = jax_setup.start_backend()
        snapshot_check.check_snapshot(path, hf_config, dtype, devices)  # before any allocation
        platform = devices[0].platform
        if sharding_axis_dims is None:
            sharding_axis_dims = sharding.default_axis_dims(
                len(devices), platform, int(hf_config.get("num_local_experts", 1)))
        dims = jax_setup.check_axis_dims(sharding_axis_dims, len(devices), platform,
                                         dense_experts=dense_experts)
        fixes = easydel_fixes.check_fixes(fixes)
        ed_model = load_easydel_model(path, dtype=dtype, sharding_axis_dims=dims,
                                      attn_mechanism=resolve_attention(attention, platform),
                                      fixes=fixes, dense_experts=dense_experts)
        return cls(ed_model, path=path, dtype=dtype, fixes=fixes)

    # --- forward ---------------------------------------------------------------------------

    def _check_layers(self, layer_ids) -> tuple[int, ...]:
        ids = tuple(int(i) for i in layer_ids)
        bad = [i for i in ids if not 0 <= i < self.num_layers]
        if bad:
            raise UserError(f"layer id(s) {bad} out of range: the teacher has {self.num_layers} "
                            f"layers (ids 0..{self.num_layers - 1})")
        return ids

    def _run(self, input_ids, attention_mask, layer_ids, logits_at):
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal [b, T]")
        sharding.check_batch(ids.shape[0], self.mesh)
        seq_len = ids.shape[1]
        length = self.run_length(seq_len)
        if length != seq_len:  # right padding: invisible to the real positions (attention.py)
            ids = jnp.pad(ids, ((0, 0), (0, length - seq_len)))
            mask = jnp.pad(mask, ((0, 0), (0, length - seq_len)))
        with self.mesh:
            feats, logits = self._jit(self._state, ids, mask, layer_ids=layer_ids,
                                      logits_at=logits_at)
        if length != seq_len:
            feats = None if feats is None else feats[:, :seq_len]
            logits = logits[:, :seq_len] if logits_at == "all" else logits
        return feats, logits

    def run_length(self, seq_len: int) -> int:
        """The length a [b, seq_len] forward runs at (padded for blocksparse attention)."""
        return run_length(seq_len, self.attention, block=self.attention_block,
                          max_positions=self.config.get("max_position_embeddings"))

    def features(self, input_ids, attention_mask, layer_ids) -> jax.Array:
        """[b, T, K*H] in the teacher dtype: outputs of `layer_ids`, concatenated in that order."""
        ids = self._check_layers(layer_ids)
        if not ids:
            raise UserError("no teacher layers selected")
        return self._run(input_ids, attention_mask, ids, None)[0]

    def features_fn(self, layer_ids):
        """(fn, state): the pure forward `fn(state, input_ids, attention_mask) -> [b, T, K*H]`
        (what `features` runs) and the weights to pass it, for a caller that jits it into a
        program of its own (train/online.py). Trace it inside `self.mesh`."""
        ids = self._check_layers(layer_ids)
        if not ids:
            raise UserError("no teacher layers selected")

        def fn(state, input_ids, attention_mask):
            return _forward(self._graphdef, state, input_ids, attention_mask, layer_ids=ids,
                            logits_at=None)[0]

        return fn, self._state

    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """[b, T, V] next-token logits at every position."""
        return self._run(input_ids, attention_mask, (), "all")[1]

    def forward(self, input_ids, attention_mask, layer_ids, logits: str = "last"):
        """(logits, features) in one pass: logits "last" ([b, V] at each row's last valid token)
        or "all" ([b, T, V]); features [b, T, K*H] as in `features`."""
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', not {logits!r}")
        feats, out = self._run(input_ids, attention_mask, self._check_layers(layer_ids), logits)
        return out, feats

    def default_layer_ids(self, num_features: int = 5) -> tuple[int, ...]:
        """The reference's choice of K teacher layers: `build_target_layer_ids(L, K)`."""
        from model.config import build_target_layer_ids

        return tuple(build_target_layer_ids(self.num_layers, num_features))

    def compiled_count(self) -> int:
        """How many programs the forward has compiled (one per batch/length/layer-ids bucket)."""
        return self._jit._cache_size()

    # --- weights and metadata --------------------------------------------------------------

    @property
    def embedding(self) -> jax.Array:
        """Input embedding [V, H] (frozen; embeds the draft's block tokens)."""
        return self._model.model.embed_tokens.embedding[...]

    @property
    def lm_head(self) -> jax.Array:
        """LM head [V, H] (HF layout), the embedding when the weights are tied."""
        if self.config.get("tie_word_embeddings", False):
            return self.embedding
        return self._model.lm_head.kernel[...].T

    @property
    def tokenizer_path(self) -> Path | None:
        """The snapshot dir when it carries a tokenizer (tokenizer.json / tokenizer_config.json)."""
        has = any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return self.path if has else None
