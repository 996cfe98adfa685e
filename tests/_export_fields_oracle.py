"""What the reference `dflash` and `speculators` read from our draft exports, inside .venv-ref.

    .venv-ref/bin/python tests/_export_fields_oracle.py JOBS.json

JOBS.json is a list of jobs. {"loader": "speculators", ...} jobs are tests/_speculators_oracle.py
jobs (its DFlashDraftModel on a speculators export: training-form hidden states and the config
as it read it). {"loader": "dflash", "draft": z-lab dir, "inputs": npz, "out": npz} jobs load
the draft with `dflash.model.DFlashDraftModel.from_pretrained` (dtype as stored, "auto") and run
one block the way its `dflash_generate` does: the block is [input_ids[ctx], mask_token_id x
(block_size - 1)] with the model's own block_size and mask_token_id, embedded with the target's
embedding; the context features are `extract_context_feature` of the target's hidden-state
stack (its layer-id convention, hidden_states[id + 1]) over the first ctx positions; positions
are pos0 .. pos0 + ctx + block_size - 1. Inputs: "stack" [L+1, T, H], "input_ids" [1, T],
"embed" [V, H], "ctx", "pos0". The out npz holds the block's hidden states [1, B, H] (float32)
and the config as the model read it (model attributes, not our JSON). Nothing of either package
is reimplemented here: this file only feeds them and records what they say.
"""
import json
import sys

import numpy as np
import torch

from _speculators_oracle import run as run_speculators


def _dflash_readback(model) -> dict:
    cfg = model.config
    rope = dict(cfg.rope_parameters or {})
    attn = [layer.self_attn for layer in model.layers]
    return {
        "layer_types": list(cfg.layer_types or []),
        # what each attention module uses (model.py Qwen3DFlashAttention.__init__)
        "layer_causal": [bool(a.is_causal) for a in attn],
        "layer_windows": [a.sliding_window for a in attn],
        "sliding_window": cfg.sliding_window,
        "rope_theta": rope.get("rope_theta"),
        "rope_parameters": {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_bias": attn[0].q_proj.bias is not None,
        "mask_token_id": model.mask_token_id,
        "target_layer_ids": list(model.target_layer_ids),
        "block_size": model.block_size,
        "num_target_layers": cfg.num_target_layers,
        "rms_norm_eps": float(model.norm.variance_epsilon),
        "layer_eps": [float(layer.input_layernorm.variance_epsilon) for layer in model.layers],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def run_dflash(job: dict) -> None:
    from dflash.model import DFlashDraftModel, extract_context_feature

    model = DFlashDraftModel.from_pretrained(job["draft"]).eval()
    dtype = next(model.parameters()).dtype
    x = dict(np.load(job["inputs"]))
    ctx, pos0, bs = int(x["ctx"]), int(x["pos0"]), model.block_size
    stack = [torch.from_numpy(s[None, :ctx]) for s in x["stack"]]
    target_hidden = extract_context_feature(stack, model.target_layer_ids).to(dtype)
    block = torch.full((1, bs), model.mask_token_id, dtype=torch.long)
    block[0, 0] = int(x["input_ids"][0, ctx])
    noise = torch.nn.functional.embedding(block, torch.from_numpy(x["embed"])).to(dtype)
    pos = torch.arange(pos0, pos0 + ctx + bs)[None]
    with torch.no_grad():
        hidden = model(position_ids=pos, noise_embedding=noise, target_hidden=target_hidden)
    np.savez(job["out"], hidden=hidden.float().numpy(),
             config=json.dumps(_dflash_readback(model)))


if __name__ == "__main__":
    torch.manual_seed(0)
    for job in json.load(open(sys.argv[1])):
        (run_dflash if job["loader"] == "dflash" else run_speculators)(job)
    print("ok")
