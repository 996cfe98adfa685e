"""What vLLM TPU (`tpu-inference` 0.32.0) computes from our draft exports, inside .venv-tpuinf.

    .venv-tpuinf/bin/python tests/_tpu_inference_oracle.py JOBS.json

Each job: {"draft": z-lab dir, "target": target config.json, "inputs": npz,
"num_speculative_tokens": n, "out": npz}. The inputs npz holds "stack" [L+1, T, H] (the
target's hidden states, HF convention: 0 = embedding output), "input_ids" [T], "embed" and
"lm_head" [V, H] (the target's, which the engine shares with the draft), "ctx".

Everything that decides the numbers is tpu-inference's own code:
- the model class its registry picks for `architectures: ["DFlashDraftModel"]`
  (models/common/model_loader.py: DFlashForCausalLM in models/jax/dflash.py), built abstract
  with nnx.eval_shape and filled by its own `load_weights` (DFlashWeightLoader ->
  weight_utils.load_hf_weights: name map, reshape, transpose, head_dim padding, dtype);
- the target layers it taps: Qwen3Model.get_dflash_aux_hidden_state_layers (models/jax/qwen3.py)
  reading the export's dflash_config.target_layer_ids; its JAX targets append a layer's
  output after running it (qwen3.py / llama3.py `__call__`), i.e. HF hidden_states[id + 1];
- block_size, mask_token_id and the block's tokens and positions: DFlashProposer.__init__ and
  its `_build_noise_block` (spec_decode/jax/dflash.py);
- fusion (`combine_hidden_states`), forward and `compute_logits` of the model, with its
  attention dispatcher (layers/common/attention_interface.attention). On CPU the Pallas RPA
  kernel cannot run, so the kernel function the dispatcher calls is replaced by the package's
  own XLA reference of it, `ref_ragged_paged_attention` (kernels/ragged_paged_attention/v3),
  which takes the same arguments; the hd64 kernel (head_dim 64) is left as is.
Weights load as float32 (the target model_config.dtype the loader casts to), so the numbers
are comparable with ours at 1e-4. The stood-in imports are in tests/_tpu_inference_standins.py.
A job that tpu-inference refuses records {"error": "<Type>: <first line>"} instead of outputs.
"""
import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import _tpu_inference_standins as standins

standins.install()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import tpu_inference.layers.common.attention_interface as attention_interface  # noqa: E402
from tpu_inference.kernels.ragged_paged_attention.v3.kernel import \
    ref_ragged_paged_attention  # noqa: E402
from tpu_inference.kernels.ragged_paged_attention.v3.kernel_hd64 import \
    ref_ragged_paged_attention_hd64  # noqa: E402
from tpu_inference.layers.common.attention_metadata import AttentionMetadata  # noqa: E402
from tpu_inference.models.common import model_loader  # noqa: E402
from tpu_inference.models.jax.dflash import DFlashForCausalLM  # noqa: E402
from tpu_inference.models.jax.qwen3 import Qwen3Model  # noqa: E402
from tpu_inference.spec_decode.jax.dflash import DFlashProposer  # noqa: E402

PAGE_SIZE = 16
KERNEL_TUNING = ("d_block_sizes", "p_block_sizes", "m_block_sizes", "vmem_limit_bytes")


def _xla(reference):
    def kernel(*args, update_kv_cache=True, **kwargs):
        """The dispatcher's kernel call, served by the package's XLA reference of that kernel
        (same positional arguments; it always writes the new K/V into the cache)."""
        assert update_kv_cache, "the reference RPA always updates the KV cache"
        for key in KERNEL_TUNING:
            kwargs.pop(key, None)
        return reference(*args, **kwargs)
    return kernel


class _OneDeviceJax:
    """attention_interface's `jax`, with shard_map as the identity it is on a 1-device mesh:
    the reference kernel loops over requests in Python, so it needs concrete (not traced)
    lengths; everything else is jax itself."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def shard_map(f, **_):
        return f


attention_interface.ragged_paged_attention = _xla(ref_ragged_paged_attention)
attention_interface.ragged_paged_attention_hd64 = _xla(ref_ragged_paged_attention_hd64)
attention_interface.jax = _OneDeviceJax()


class _ModelConfig(SimpleNamespace):
    """The fields of vLLM's ModelConfig that the DFlash path reads, computed as vLLM does."""

    def get_vocab_size(self):
        return self.hf_config.vocab_size

    def get_hidden_size(self):
        return self.hf_config.hidden_size

    def get_head_size(self):
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def vllm_config(draft_dir: str, target_cfg: dict, num_spec: int) -> SimpleNamespace:
    draft = AutoConfig.from_pretrained(draft_dir)  # what vLLM's get_config builds (transformers)
    target = AutoConfig.for_model(target_cfg["model_type"],
                                  **{k: v for k, v in target_cfg.items() if k != "model_type"})
    common = dict(dtype=jnp.float32, is_multimodal_model=False, seed=0, hf_overrides={})
    return SimpleNamespace(
        model_config=_ModelConfig(hf_config=target, model=str(draft_dir), **common),
        speculative_config=SimpleNamespace(
            method="dflash", num_speculative_tokens=num_spec,
            draft_model_config=_ModelConfig(hf_config=draft, model=str(draft_dir), **common)),
        load_config=SimpleNamespace(download_dir=None, load_format="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto"), quant_config=None,
        additional_config={})


def _taps_dflash(target_hf_config) -> bool:
    """Whether the JAX model its registry has for the target collects DFlash's features
    (qwen3.py / llama3.py have get_dflash_aux_hidden_state_layers)."""
    import inspect

    cls = model_loader._get_model_architecture(target_hf_config)
    return "get_dflash_aux_hidden_state_layers" in inspect.getsource(sys.modules[cls.__module__])


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run(job: dict) -> dict:
    x = dict(np.load(job["inputs"]))
    cfg = vllm_config(job["draft"], json.loads(Path(job["target"]).read_text()),
                      int(job["num_speculative_tokens"]))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                axis_names=("data", "attn_dp", "expert", "model"))
    ctx = int(x["ctx"])
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: DFlashForCausalLM(cfg, jax.random.key(0), mesh))
        model.load_weights(jax.random.key(0))
        # DFlashProposer.load_model shares the target's embedding and LM head
        model.model.embed_tokens.embedding.value = jnp.asarray(x["embed"])
        model.lm_head.weight.value = jnp.asarray(x["lm_head"]).T  # its transposed assignment
        proposer = DFlashProposer(cfg, SimpleNamespace(mesh=mesh, max_num_tokens=4096,
                                                       max_model_len=4096))
        layer_ids = Qwen3Model.get_dflash_aux_hidden_state_layers(None, cfg)
        feats = jnp.concatenate([jnp.asarray(x["stack"][i + 1][:ctx]) for i in layer_ids], -1)
        target_hidden = model.combine_hidden_states(feats)
        seq_lens = jnp.asarray([ctx], jnp.int32)
        tokens, positions = proposer._build_noise_block(
            seq_lens, jnp.asarray([int(x["input_ids"][ctx])], jnp.int32),
            proposer.mask_token_id, proposer.block_size)
        bs = proposer.block_size
        attn = model.model.layers[0].self_attn
        pages = -(-(ctx + bs) // PAGE_SIZE)
        # the cache layout its runner allocates (hd64 has its own kernel and layout)
        shape_fn = (attention_interface.get_kv_cache_shape_hd64 if attn.head_dim == 64
                    else attention_interface.get_kv_cache_shape)
        cache_shape = shape_fn(pages, PAGE_SIZE, attn.num_kv_heads, attn.head_dim, jnp.float32)
        caches = [jnp.zeros(cache_shape, jnp.float32) for _ in model.model.layers]
        md = AttentionMetadata(
            input_positions=positions, block_tables=jnp.arange(pages, dtype=jnp.int32),
            seq_lens=seq_lens, query_start_loc=jnp.asarray([0, bs], jnp.int32),
            request_distribution=jnp.asarray([0, 0, 1], jnp.int32))
        read = {"target_layer_ids": [int(i) for i in layer_ids], "block_size": int(bs),
                "mask_token_id": int(proposer.mask_token_id),
                "block_tokens": np.asarray(tokens).tolist(),
                "block_positions": np.asarray(positions).tolist(),
                "rope_theta": float(attn.rope_theta),
                "rope_scaling": dict(attn.rope_scaling) if attn.rope_scaling else None,
                "head_dim": int(attn.head_dim), "head_dim_original": int(attn.head_dim_original),
                "fc_in": int(model.model.fc.kernel.get_value().shape[0]),
                # which implementation serves target and draft (DFlashProposer.load_model
                # refuses a mismatch), and whether the target's JAX model taps DFlash features
                "impl": {"target": model_loader.resolve_model_impl_type(cfg),
                         "draft": model_loader.resolve_model_impl_type(cfg, True)},
                "draft_class": model_loader._get_model_architecture(
                    cfg.speculative_config.draft_model_config.hf_config).__name__,
                "target_jax_taps_dflash": _taps_dflash(cfg.model_config.hf_config),
                "stood_in": standins.STOOD_IN}
        out = {"target_hidden": np.asarray(target_hidden)}
        ctx_positions = jnp.arange(ctx, dtype=jnp.int32)
        if job.get("zero_positions"):  # RoPE the identity everywhere (see the test)
            ctx_positions = jnp.zeros_like(ctx_positions)
            md = AttentionMetadata(**{**md.__dict__, "input_positions": jnp.zeros_like(positions)})
        try:
            _, hidden, _, _ = model(caches, tokens, (target_hidden, jnp.asarray([0, ctx], jnp.int32),
                                                     ctx_positions), md)
            out.update(hidden=np.asarray(hidden), logits=np.asarray(model.compute_logits(hidden)))
        except Exception as e:  # e.g. its hd64 kernel refusing bidirectional attention
            read["error"] = _first_line(e)
    return dict(out, config=json.dumps(read))


if __name__ == "__main__":
    for job in json.load(open(sys.argv[1])):
        try:
            result = run(job)
        except Exception as e:  # a refusal while loading: record it, the test judges it
            traceback.print_exc()
            result = {"config": json.dumps({"error": _first_line(e),
                                            "stood_in": standins.STOOD_IN})}
        np.savez(job["out"], **result)
    print("ok")
