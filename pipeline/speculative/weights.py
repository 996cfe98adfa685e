"""The cached GPT-OSS decoder's static facts, its parameter tree, its mesh and its weights.

One parameter tree serves every use: `param_shapes` gives it abstract (tools.tpu_compile),
`load_target` fills it from an HF snapshot (bf16 or float32 safetensors, or the published MXFP4
experts, dequantized exactly by pipeline.speculative.mxfp4) and places it on the mesh with
`param_specs`.

Mesh ("data", "model"): the decoder is tensor-parallel over "model" (Megatron style, weights
stationary: a decode step reads each weight once on one chip and moves only activations) and
splits the batch over "data". Over "model", attention is split by KV head (each chip holds its
query heads' K/V cache rows, so attention needs no communication), the experts by their
intermediate dim (each chip computes every routed token's slice of its experts), the embedding
and LM head by vocab; two all-reduces of the [tokens, H] residual update per layer. Why not
FSDP: it all-gathers every weight at every step (8x a decode step's HBM traffic in ICI traffic);
why not expert parallelism over "model": a chip's share of routed tokens is data-dependent, and a
static program would size every chip for the worst case (all tokens on its experts).
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import rope
from pipeline.errors import UserError
from pipeline.speculative import mxfp4
from pipeline.teacher.snapshot_check import check_snapshot

DATA, MODEL = "data", "model"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class TargetShape:
    """Static facts of the decoder (hashable: closed over by jit): config shapes, the compute
    dtype of its weights, caches and matmuls (norms, router, softmax and the residual stream stay
    float32), and the mesh it runs on."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    sliding_window: int
    layer_sliding: tuple  # per layer: True for sliding_attention
    top_k: int
    feature_layers: tuple  # layer ids whose outputs are the draft's features
    vocab: int = 0
    experts: int = 0
    intermediate: int = 0
    swiglu_limit: float = 7.0
    dtype: str = "float32"
    mesh: Mesh | None = None

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def model_shards(self) -> int:
        return dict(self.mesh.shape)[MODEL] if self.mesh is not None else 1

    @property
    def data_shards(self) -> int:
        return dict(self.mesh.shape)[DATA] if self.mesh is not None else 1

    @property
    def vocab_sharded(self) -> bool:
        return self.vocab % self.model_shards == 0


def load_hf_config(path):
    """The snapshot's HF config; a missing, non-JSON or unknown config.json is a UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}/config.json: not a usable model config ({msg})") from None


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
    """'auto' -> bfloat16 on an accelerator, float32 on the CPU (emulated bf16 is slower there,
    and the CPU tests hold the decoder to HF torch in float32)."""
    if dtype == "auto":
        return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype


def default_devices() -> list:
    """Every accelerator; one device on the CPU (simulated host devices share the same cores)."""
    return jax.devices()[:1] if jax.default_backend() == "cpu" else jax.devices()


def decoder_mesh(devices, cfg, model: int | None = None) -> Mesh:
    """Mesh ("data", "model") over `devices`: "model" = `model`, or the largest count of devices
    that divides the KV heads and the expert width (each chip a whole KV head and an even share
    of every expert), "data" the rest."""
    if isinstance(cfg, dict):
        cfg = types.SimpleNamespace(**cfg)
    n = len(devices)
    kv, inter = int(cfg.num_key_value_heads), int(cfg.intermediate_size)
    if model is None:
        model = max(m for m in range(1, n + 1) if n % m == 0 and kv % m == 0 and inter % m == 0)
    if model < 1 or n % model or kv % model or inter % model:
        raise UserError(f"model axis {model} must divide the {n} devices, the {kv} KV heads and "
                        f"the expert width {inter}")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // model, model), (DATA, MODEL))


def shape_from_config(cfg, feature_layers=(0,), *, dtype: str = "float32",
                      mesh: Mesh | None = None) -> TargetShape:
    """TargetShape of an HF GPT-OSS config (object or config.json dict)."""
    if isinstance(cfg, dict):
        cfg = types.SimpleNamespace(**cfg)
    if getattr(cfg, "model_type", None) != "gpt_oss":
        raise UserError(f"cached target supports gpt_oss, got {getattr(cfg, 'model_type', None)!r}")
    bad = [i for i in feature_layers if not 0 <= int(i) < cfg.num_hidden_layers]
    if bad:
        raise UserError(f"feature layers {bad} outside the teacher's {cfg.num_hidden_layers} layers")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return TargetShape(
        num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=head_dim, eps=cfg.rms_norm_eps,
        sliding_window=int(getattr(cfg, "sliding_window", 0) or 0),
        layer_sliding=tuple(t == "sliding_attention" for t in cfg.layer_types),
        top_k=int(getattr(cfg, "num_experts_per_tok", None) or cfg.experts_per_token),
        feature_layers=tuple(int(i) for i in feature_layers), vocab=int(cfg.vocab_size),
        experts=int(cfg.num_local_experts), intermediate=int(cfg.intermediate_size),
        swiglu_limit=float(getattr(cfg, "swiglu_limit", 7.0) or 7.0), dtype=dtype, mesh=mesh)


def _layer_shapes(s: TargetShape) -> dict:
    """name -> (shape, is_big): big tensors take the compute dtype, the rest float32."""
    h, q, kv, e, i2 = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.experts, 2 * s.intermediate
    return {"q_proj": ((q, h), True), "k_proj": ((kv, h), True), "v_proj": ((kv, h), True),
            "o_proj": ((h, q), True), "q_proj_b": ((q,), False), "k_proj_b": ((kv,), False),
            "v_proj_b": ((kv,), False), "o_proj_b": ((h,), False), "sinks": ((s.heads,), False),
            "ln1": ((h,), False), "ln2": ((h,), False), "router": ((e, h), False),
            "router_b": ((e,), False), "gate_up": ((e, h, i2), True), "gate_up_b": ((e, i2), False),
            "down": ((e, s.intermediate, h), True), "down_b": ((e, h), False)}


_LAYER_SPECS = {"q_proj": P(MODEL, None), "k_proj": P(MODEL, None), "v_proj": P(MODEL, None),
                "o_proj": P(None, MODEL), "q_proj_b": P(MODEL), "k_proj_b": P(MODEL),
                "v_proj_b": P(MODEL), "o_proj_b": P(), "sinks": P(MODEL), "ln1": P(), "ln2": P(),
                "router": P(), "router_b": P(), "gate_up": P(None, None, MODEL),
                "gate_up_b": P(None, MODEL), "down": P(None, MODEL, None), "down_b": P()}


def param_specs(s: TargetShape) -> dict:
    """PartitionSpecs of the parameter tree (module docstring: why this split)."""
    vocab = P(MODEL, None) if s.vocab_sharded else P()
    return {"embed": vocab, "lm_head": vocab, "norm": P(), "inv_freq": P(), "rope_scale": P(),
            "layers": [dict(_LAYER_SPECS) for _ in range(s.num_layers)]}


def param_shapes(s: TargetShape) -> dict:
    """The parameter tree as ShapeDtypeStructs (sharded over s.mesh when it has one)."""
    big, f32 = s.jnp_dtype, jnp.float32
    specs = param_specs(s)

    def sds(shape, dtype, spec):
        sh = NamedSharding(s.mesh, spec) if s.mesh is not None else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    layer = _layer_shapes(s)
    return {"embed": sds((s.vocab, s.hidden), big, specs["embed"]),
            "lm_head": sds((s.vocab, s.hidden), big, specs["lm_head"]),
            "norm": sds((s.hidden,), f32, P()), "inv_freq": sds((s.head_dim // 2,), f32, P()),
            "rope_scale": sds((), f32, P()),
            "layers": [{k: sds(shp, big if is_big else f32, _LAYER_SPECS[k])
                        for k, (shp, is_big) in layer.items()} for _ in range(s.num_layers)]}


_HF_LAYER = {"q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
             "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
             "q_proj_b": "self_attn.q_proj.bias", "k_proj_b": "self_attn.k_proj.bias",
             "v_proj_b": "self_attn.v_proj.bias", "o_proj_b": "self_attn.o_proj.bias",
             "sinks": "self_attn.sinks", "ln1": "input_layernorm.weight",
             "ln2": "post_attention_layernorm.weight", "router": "mlp.router.weight",
             "router_b": "mlp.router.bias", "gate_up": "mlp.experts.gate_up_proj",
             "gate_up_b": "mlp.experts.gate_up_proj_bias", "down": "mlp.experts.down_proj",
             "down_b": "mlp.experts.down_proj_bias"}


def _read_layer(path: Path, i: int, wmap: dict) -> dict:
    """Layer i's tensors (numpy, HF layouts), MXFP4 experts dequantized; a missing bias is zero."""
    from model.safetensors_io import read_safetensors

    pre = f"model.layers.{i}."
    names = [pre + v for v in _HF_LAYER.values()]
    quant = {}
    for proj in mxfp4.QUANTIZED_PROJECTIONS:
        base = pre + "mlp.experts." + proj
        if base + "_blocks" in wmap:
            names += [base + "_blocks", base + "_scales"]
            quant[proj] = base
    w = read_safetensors(path, names)
    out = {k: w.get(pre + v) for k, v in _HF_LAYER.items()}
    for proj, base in quant.items():
        out["gate_up" if proj == "gate_up_proj" else "down"] = mxfp4.dequantize(
            w[base + "_blocks"], w[base + "_scales"])
    return out


def load_target(path, feature_layers, *, dtype: str = "float32", mesh: Mesh | None = None,
                ) -> tuple[TargetShape, dict, object]:
    """(shape, params placed on the mesh, hf_config) from a GPT-OSS HF snapshot directory.
    Reads one layer at a time, so the host holds one layer's float32 copy at most."""
    from model.safetensors_io import read_safetensors, weight_map

    path = Path(path)
    cfg = load_hf_config(path)
    dtype = resolve_dtype(dtype)
    mesh = mesh if mesh is not None else decoder_mesh(default_devices()[:1], cfg)
    s = shape_from_config(cfg, feature_layers, dtype=dtype, mesh=mesh)
    check_snapshot(path, cfg.to_dict(), jnp.dtype(dtype), list(mesh.devices.flat))  # before any allocation
    abstract = param_shapes(s)
    wmap = weight_map(path)

    def put(x, like, name):
        if x is None:
            if name.endswith("_b"):  # attention_bias false: a zero bias is the same function
                x = np.zeros(like.shape, np.float32)
            else:
                raise UserError(f"{path}: tensor {name} missing from the snapshot")
        x = np.asarray(x)
        if tuple(x.shape) != tuple(like.shape):
            raise UserError(f"{path}: {name} has shape {list(x.shape)}, the config says "
                            f"{list(like.shape)}")
        # cast on the host and place shard by shard (jnp.asarray would first put the whole
        # tensor on one device: 4.2 GB per gpt-oss-120b expert projection)
        return jax.device_put(x.astype(np.float32, copy=False).astype(like.dtype), like.sharding)

    top = read_safetensors(path, ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    if "model.embed_tokens.weight" not in top:
        raise UserError(f"{path}: no model.embed_tokens.weight (not a GPT-OSS snapshot)")
    inv, scale = rope.hf_config_frequencies(cfg)
    params = {"embed": put(top["model.embed_tokens.weight"], abstract["embed"], "embed"),
              "lm_head": put(top.get("lm_head.weight", top["model.embed_tokens.weight"]),
                             abstract["lm_head"], "lm_head"),
              "norm": put(top.get("model.norm.weight"), abstract["norm"], "model.norm.weight"),
              "inv_freq": put(np.asarray(inv), abstract["inv_freq"], "inv_freq"),
              "rope_scale": put(np.float32(scale), abstract["rope_scale"], "rope_scale"),
              "layers": []}
    for i in range(s.num_layers):
        raw = _read_layer(path, i, wmap)
        params["layers"].append({k: put(raw[k], like, f"model.layers.{i}.{_HF_LAYER[k]}")
                                 for k, like in abstract["layers"][i].items()})
    return s, params, cfg


def param_bytes(s: TargetShape) -> int:
    """Bytes of the whole parameter tree (all chips together)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(param_shapes(s)))
