"""The `speculators` (vLLM) checkpoint format for DFlash drafts: config out and in.

A speculators DFlash checkpoint (`speculators==0.9.0`, models/dflash/config.py) is a
config.json with `speculators_model_type: "dflash"`, the draft body as a Qwen3 config under
`transformer_layer_config`, and `block_size`, `mask_token_id`, `aux_hidden_state_layer_ids`,
`draft_vocab_size`, `sliding_window_non_causal`, `sample_from_anchor` and a
`speculators_config` (algorithm, greedy proposal of B-1 tokens, verifier) beside it. Its
weights carry the z-lab names (layers.*, fc, hidden_norm, norm): embed_tokens, lm_head,
verifier_lm_head and verifier_norm belong to the verifier and are not saved for a full-vocab
draft (models/dflash/core.py:54-57, 157-160). So only the config differs from z-lab.

Conventions that differ from z-lab, with the speculators source that fixes them:
- Layer ids: speculators indexes HF `hidden_states` directly (0 = embedding output), z-lab
  uses "output of decoder layer i" = hidden_states[i + 1]; its own z-lab converter adds one
  (convert/dflash/converter.py:117-126). That converter also drops the verifier's last layer,
  which vLLM always captures and splits off as `verifier_last_hidden_states`: a draft fed by
  the target's last layer cannot be expressed, so it is refused here.
- Attention: full layers are always bidirectional within the block; sliding layers are causal
  unless `sliding_window_non_causal` (models/dflash/attention.py:223-224, 277-278), and a sliding
  layer without a window is treated as full (non_causal when sliding_window is None).
- No logit multiplier, logit softcap or embedding scale exist in that model (core.py:468-469).
"""
from __future__ import annotations

from typing import Any

from model.config import DFlash2Config, DraftConfig

SPECULATORS_VERSION = "0.9.0"  # the release whose format and model the tests check against
# Tensors a speculators checkpoint may carry that are the verifier's, not the draft's.
VERIFIER_OWNED = ("embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight",
                  "verifier_norm.weight", "t2d", "d2t")
# z-lab top-level keys that are not Qwen3 fields (speculators' converter drops the same).
_NOT_TRANSFORMER = ("architectures", "dflash_config", "num_target_layers", "block_size",
                    "is_causal")


class FormatError(ValueError):
    """A draft config that the requested checkpoint format cannot express (one-line message)."""


def is_speculators_config(d: dict) -> bool:
    return isinstance(d, dict) and "speculators_model_type" in d


def _check_expressible(config: DraftConfig) -> None:
    sliding = [t == "sliding_attention" for t in config.layer_types]
    problems = []
    for name, value, neutral in (("logits_scaling", config.logits_scaling, None),
                                 ("final_logit_softcapping", config.final_logit_softcapping, None),
                                 ("input_embedding_scale", config.input_embedding_scale, 1.0)):
        if value != neutral:
            problems.append(f"{name}={value} (the speculators DFlash model has no such field)")
    if config.is_causal is True and not all(sliding):
        problems.append("is_causal=true on full-attention layers (speculators keeps full "
                        "layers bidirectional)")
    if any(sliding) and config.sliding_window is None and config.is_causal is not False:
        problems.append("sliding layers without a sliding_window (speculators would make them "
                        "bidirectional)")
    last = config.num_target_layers - 1
    if last in config.target_layer_ids:
        problems.append(f"target layer {last} is the target's last layer, which vLLM captures "
                        "separately and speculators cannot list as an aux layer")
    if problems:
        raise FormatError("cannot export to the speculators format: " + "; ".join(problems))


def to_speculators_dict(config: DraftConfig, dtype: str = "float32",
                        verifier: str | None = None,
                        verifier_architectures: tuple[str, ...] = ()) -> dict:
    """The speculators config.json dict of `config`; FormatError if it cannot be expressed."""
    _check_expressible(config)
    zlab = config.to_hf_dict(dtype=dtype)
    layer = {k: v for k, v in zlab.items() if k not in _NOT_TRANSFORMER}
    # Not a speculators field, but Qwen3Config keeps unknown keys: this is where the target's
    # depth survives the trip (speculators reads it from the verifier otherwise).
    layer["num_target_layers"] = config.num_target_layers
    non_causal = config.is_causal is False and "sliding_attention" in config.layer_types
    kind = config.arch  # "dflash" or "dflash2" (speculators 0.9.0 models/dflash2/config.py)
    out = {
        "architectures": ["DFlash2DraftModel" if config.dflash2 else "DFlashSpeculator"],
        "speculators_model_type": kind,
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer,
        "draft_vocab_size": config.vocab_size,
        "block_size": config.block_size,
        "target_hidden_size": None,
        "aux_hidden_state_layer_ids": [i + 1 for i in config.target_layer_ids],
        "mask_token_id": config.mask_token_id,
        "sliding_window_non_causal": non_causal,
        "sample_from_anchor": False,
        "speculators_config": {
            "algorithm": kind,
            "proposal_methods": [{"proposal_type": "greedy",
                                  "speculative_tokens": config.block_size - 1}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": list(verifier_architectures)},
        },
        "dtype": dtype,
    }
    if config.dflash2 is not None:  # the four DFlash2 fields sit at the top level there
        out.update(config.dflash2.to_dict())
    return out


def from_speculators_dict(d: dict, num_target_layers: int | None = None) -> DraftConfig:
    """DraftConfig of a speculators DFlash config.json dict; FormatError for what we cannot run.

    num_target_layers: taken from transformer_layer_config (our exports write it), else from
    this argument (e.g. read off the verifier's config by the caller).
    """
    kind = d.get("speculators_model_type")
    if kind not in ("dflash", "dflash2"):
        raise FormatError(f"speculators_model_type {kind!r} is not a DFlash draft this project "
                          "runs (only 'dflash' and 'dflash2')")
    layer = dict(d.get("transformer_layer_config") or {})
    if not layer:
        raise FormatError("speculators config has no transformer_layer_config")
    if d.get("sample_from_anchor"):
        raise FormatError("sample_from_anchor=true (slot 0 predicts) is not DFlash as run here")
    vocab = int(layer.get("vocab_size", 0))
    if int(d.get("draft_vocab_size", vocab)) != vocab:
        raise FormatError(f"reduced draft vocabulary ({d.get('draft_vocab_size')} of {vocab} "
                          "tokens, t2d/d2t maps) is not supported")
    aux = d.get("aux_hidden_state_layer_ids")
    if not aux:
        raise FormatError("speculators config has no aux_hidden_state_layer_ids")
    if d.get("mask_token_id") is None:
        raise FormatError("speculators config has no mask_token_id")
    depth = layer.pop("num_target_layers", None) or num_target_layers
    if depth is None:
        raise FormatError("the target's layer count is unknown (no num_target_layers in "
                          "transformer_layer_config and no local verifier config)")
    zlab: dict[str, Any] = {k: v for k, v in layer.items() if k != "model_type"}
    zlab.update(num_target_layers=int(depth), dflash_config={
        "block_size": int(d.get("block_size", 8)), "mask_token_id": int(d["mask_token_id"]),
        "target_layer_ids": [int(i) - 1 for i in aux]})
    if kind == "dflash2":  # speculators' defaults where a field is absent (DFlash2SpeculatorConfig)
        zlab["architectures"] = ["DFlash2DraftModel"]
        zlab["dflash_config"].update(DFlash2Config.read(d.get).to_dict())
    non_causal = d.get("sliding_window_non_causal", kind == "dflash2")  # absent: its default
    if non_causal and "sliding_attention" in (layer.get("layer_types") or ()):
        zlab["is_causal"] = False
    return DraftConfig.from_hf_dict(zlab)
