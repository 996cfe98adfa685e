"""DraftConfig: the DFlash draft's shape, derived from a target's HF config or read from z-lab's.

The z-lab export format is a transformers `Qwen3Config` plus `architectures: ["DFlashDraftModel"]`,
`num_target_layers` and `dflash_config: {block_size, mask_token_id, target_layer_ids}`. The
reading rules below mirror transformers 5.5 `Qwen3Config` and `dflash==0.1.0` so that a config
means the same model here as in the reference (e.g. `sliding_window` only counts when
`use_sliding_window` is true).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "yarn")
# Keys of a rope dict that are not scaling parameters (stored in their own fields).
_ROPE_NON_SCALING = ("rope_theta", "type")


@dataclasses.dataclass(frozen=True)
class DFlash2Config:
    """The two DFlash2 additions (z-lab `DFlash2DraftModel`, speculators `dflash2`); the defaults
    are both references' (speculators 0.9.0 DFlash2SpeculatorConfig)."""

    conv_kernel_size: int = 2  # causal taps of each grouped dynamic convolution (within a block)
    conv_group_size: int = 16  # hidden channels that share one dynamic tap weight
    selector_rank: int = 256  # rank of the candidate selector's codebooks [V, rank]
    selector_top_k: int = 16  # unary top-K candidates the selector reranks

    FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def read(cls, value) -> "DFlash2Config":
        """From a field getter name -> value (None where absent: the default)."""
        return cls(**{k: int(v) for k in cls.FIELDS if (v := value(k)) is not None})


ARCHITECTURES = {"DFlashDraftModel": "dflash", "DFlash2DraftModel": "dflash2"}


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers whose outputs feed the draft, with `dflash==0.1.0` semantics.

    One layer -> the middle one; otherwise evenly spread from layer 1 to layer L-3, rounded
    with Python's round (half to even), exactly as the reference does.
    """
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [round(start + (i * span) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """Shape and semantics of a DFlash draft; field names follow HF Qwen3Config where one exists."""

    hidden_size: int  # = the target's hidden size (draft tokens use the target's embedding)
    intermediate_size: int  # SwiGLU width of each draft layer
    num_hidden_layers: int  # draft decoder layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (LM head rows)
    block_size: int  # B: tokens proposed per draft forward (slot 0 is the anchor)
    mask_token_id: int  # real vocab id used for the B-1 masked slots
    target_layer_ids: tuple[int, ...]  # target layers whose outputs are the K feature streams
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs (hashable), e.g. (("beta_fast", 32.0), ...,
    # ("rope_type", "yarn")); None for plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"
    sliding_window: int | None = None  # window of sliding layers; None = causal, unwindowed
    is_causal: bool | None = None  # None: sliding layers causal, full layers bidirectional
    max_position_embeddings: int = 32768
    final_logit_softcapping: float | None = None  # tanh softcap of draft logits (reference name)
    logits_scaling: float | None = None  # multiplies draft logits (reference: output_multiplier)
    input_embedding_scale: float = 1.0  # multiplies embedded block tokens (reference name)
    hidden_act: str = "silu"
    # DFlash2: the convolutions and the candidate selector (None = a DFlash draft).
    dflash2: DFlash2Config | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        if isinstance(self.dflash2, dict):
            object.__setattr__(self, "dflash2", DFlash2Config(**self.dflash2))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _freeze_rope(dict(self.rope_scaling)))
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(
                f"{len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")
        if any(t not in LAYER_TYPES for t in self.layer_types):
            problems.append(f"layer_types must be among {LAYER_TYPES}, got {self.layer_types}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE rotates pairs)")
        if self.block_size < 1 or not self.target_layer_ids:
            problems.append("block_size >= 1 and at least one target layer are required")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append("sliding_window must be >= 1")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        rope_type = self.rope_params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {rope_type!r} is not supported ({ROPE_TYPES})")
        if float(self.rope_params.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append("partial_rotary_factor != 1 is not supported")
        d2 = self.dflash2
        if d2 is not None:
            if min(d2.conv_kernel_size, d2.conv_group_size, d2.selector_rank,
                   d2.selector_top_k) < 1:
                problems.append(f"DFlash2 fields must be >= 1, got {d2.to_dict()}")
            elif self.hidden_size % d2.conv_group_size:
                problems.append(f"hidden_size {self.hidden_size} is not a multiple of "
                                f"conv_group_size {d2.conv_group_size}")
            elif d2.conv_kernel_size > self.block_size:
                problems.append(f"conv_kernel_size {d2.conv_kernel_size} exceeds block_size "
                                f"{self.block_size}")
            elif d2.selector_top_k > self.vocab_size:
                problems.append(f"selector_top_k {d2.selector_top_k} exceeds vocab_size "
                                f"{self.vocab_size}")
        if problems:
            raise ValueError("invalid DraftConfig: " + "; ".join(problems))

    @property
    def arch(self) -> str:
        """"dflash" or "dflash2" (the train.main --arch names)."""
        return "dflash" if self.dflash2 is None else "dflash2"

    @property
    def num_features(self) -> int:
        """K: how many target layers are concatenated into the draft's context features."""
        return len(self.target_layer_ids)

    @property
    def rope_params(self) -> dict[str, Any]:
        """RoPE parameters as transformers' `rope_parameters` dict (rope_type + theta + scaling)."""
        params = dict(self.rope_scaling or ())
        params.setdefault("rope_type", "default")
        params["rope_theta"] = self.rope_theta
        return params

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_target(cls, hf_config: dict, *, num_draft_layers: int, block_size: int,
                    mask_token_id: int, num_features: int = 5,
                    target_layer_ids: tuple[int, ...] | None = None,
                    intermediate_size: int | None = None,
                    layer_types: tuple[str, ...] | None = None,
                    sliding_window: int | None = None) -> "DraftConfig":
        """Draft for a target given its HF config dict (hidden size, heads, rope, vocab from it).

        intermediate_size defaults to the target's dense FFN width; for an MoE target (GPT-OSS)
        whose `intermediate_size` is one expert's, it defaults to 8/3 * hidden rounded up to 128
        (2880 -> 7680, the released z-lab/gpt-oss-20b-DFlash value). Draft layers default to full
        attention; pass layer_types and sliding_window for sliding layers.
        """
        num_layers = int(hf_config["num_hidden_layers"])
        hidden = int(hf_config["hidden_size"])
        heads = int(hf_config["num_attention_heads"])
        if target_layer_ids is None:
            target_layer_ids = build_target_layer_ids(num_layers, num_features)
        if intermediate_size is None:
            moe = any(k in hf_config for k in ("num_local_experts", "num_experts"))
            intermediate_size = (math.ceil(8 * hidden / 3 / 128) * 128 if moe
                                 else int(hf_config["intermediate_size"]))
        theta, scaling = _read_rope(hf_config)
        return cls(
            hidden_size=hidden, intermediate_size=int(intermediate_size),
            num_hidden_layers=num_draft_layers, num_attention_heads=heads,
            num_key_value_heads=int(hf_config.get("num_key_value_heads") or heads),
            head_dim=int(hf_config.get("head_dim") or hidden // heads),
            vocab_size=int(hf_config["vocab_size"]), block_size=block_size,
            mask_token_id=mask_token_id, target_layer_ids=tuple(target_layer_ids),
            num_target_layers=num_layers, rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            attention_bias=bool(hf_config.get("attention_bias", False)),
            layer_types=tuple(layer_types or ()), sliding_window=sliding_window,
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 32768)),
        )

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DraftConfig":
        """Read a z-lab draft config.json dict, resolving values as Qwen3Config + dflash do."""
        dflash = d.get("dflash_config") or {}

        def draft_value(name, default=None):  # dflash_config first, then top level (reference)
            return dflash.get(name, d.get(name, default))

        if "num_target_layers" not in d:
            raise ValueError("config has no num_target_layers (not a DFlash draft config)")
        layers = int(d["num_hidden_layers"])
        heads = int(d["num_attention_heads"])
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        layer_types = d.get("layer_types") or [
            "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28)
            else "full_attention" for i in range(layers)]
        target_ids = draft_value("target_layer_ids") or build_target_layer_ids(
            int(d["num_target_layers"]), layers)
        theta, scaling = _read_rope(d)
        archs = [a for a in d.get("architectures") or () if a in ARCHITECTURES]
        dflash2 = (DFlash2Config.read(draft_value) if "DFlash2DraftModel" in archs
                   or draft_value("selector_rank") is not None else None)
        multiplier = draft_value("output_multiplier")
        softcap = draft_value("final_logit_softcapping")
        return cls(
            hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            vocab_size=int(d["vocab_size"]), block_size=int(draft_value("block_size", 16)),
            mask_token_id=int(draft_value("mask_token_id")), target_layer_ids=tuple(target_ids),
            num_target_layers=int(d["num_target_layers"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, attention_bias=bool(d.get("attention_bias", False)),
            layer_types=tuple(layer_types), sliding_window=None if window is None else int(window),
            is_causal=d.get("is_causal"),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            final_logit_softcapping=None if softcap is None else float(softcap),
            logits_scaling=None if multiplier is None else float(multiplier),
            input_embedding_scale=float(draft_value("input_embedding_scale", 1.0)),
            hidden_act=d.get("hidden_act", "silu"), dflash2=dflash2,
        )

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The z-lab config.json dict (Qwen3Config fields + DFlash keys) the reference loads."""
        dflash = {"block_size": self.block_size, "mask_token_id": self.mask_token_id,
                  "target_layer_ids": list(self.target_layer_ids)}
        if self.logits_scaling is not None:
            dflash["output_multiplier"] = self.logits_scaling
        if self.final_logit_softcapping is not None:
            dflash["final_logit_softcapping"] = self.final_logit_softcapping
        if self.input_embedding_scale != 1.0:
            dflash["input_embedding_scale"] = self.input_embedding_scale
        if self.dflash2 is not None:  # where the reference reads them first (_draft_value)
            dflash.update(self.dflash2.to_dict())
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        d = {
            "architectures": ["DFlash2DraftModel" if self.dflash2 else "DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
            # Legacy rope keys: read by transformers 4.x and 5.x, SGLang and vLLM alike.
            "rope_theta": self.rope_theta, "rope_scaling": scaling,
            "attention_bias": self.attention_bias, "attention_dropout": 0.0,
            "layer_types": list(self.layer_types),
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window, "max_window_layers": self.num_hidden_layers,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size, "tie_word_embeddings": False,
            "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
            "num_target_layers": self.num_target_layers, "dflash_config": dflash,
            # also top level, as z-lab's released configs: vLLM TPU (tpu-inference) reads the
            # block size only there, else it takes num_speculative_tokens + 1
            "block_size": self.block_size,
        }
        if self.is_causal is not None:
            d["is_causal"] = self.is_causal
        return d

    @classmethod
    def tiny(cls, **overrides) -> "DraftConfig":
        """A CPU-test-sized draft (hidden 64, 2 layers, 4/2 heads, vocab 256)."""
        base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                    block_size=8, mask_token_id=255, target_layer_ids=(1, 3, 5),
                    num_target_layers=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=4096)
        base.update(overrides)
        return cls(**base)


def _freeze_rope(d: dict) -> tuple[tuple[str, Any], ...] | None:
    d = {k: v for k, v in d.items() if k not in _ROPE_NON_SCALING}
    if "type" in d and "rope_type" not in d:
        d["rope_type"] = d.pop("type")
    d.setdefault("rope_type", "default")
    if d == {"rope_type": "default"}:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _read_rope(d: dict) -> tuple[float, tuple | None]:
    """(theta, frozen scaling) from legacy rope_theta/rope_scaling or v5 rope_parameters."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if params and set(params) <= set(LAYER_TYPES):
        raise ValueError("per-layer-type rope_parameters are not supported")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if params.get("rope_type") in ("yarn",) and "original_max_position_embeddings" not in params:
        # transformers fills it from the top level (or max_position_embeddings).
        params["original_max_position_embeddings"] = d.get(
            "original_max_position_embeddings", d.get("max_position_embeddings"))
    if params.get("rope_type") in ("dynamic", "longrope", "llama3"):
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported")
    return float(theta), _freeze_rope(params)
