"""A roofline estimate of the dump's teacher forward: tokens/s bounded by compute and by HBM.

    est = teacher_roofline(hf_config, batch=8, seq_len=3072, run_len=3072, layer_ids=..., chip,
                           chips=8, memory=row)

- compute: model FLOPs of one forward (every decoder layer, as EasyDeL runs them all; no LM
  head: the dump asks for none) over the chips' bf16 peak. Per token and layer: the q/k/v/o
  projections, the router, the k routed experts (gate, up, down), and the attention scores
  and weighted sum over the keys each query sees (causal: position + 1 keys; sliding layers
  at most `sliding_window`). Padded positions (run_len > seq_len) are computed too.
- memory: per chip, every weight it holds read once (XLA's argument bytes) plus the features
  it writes, over the chip's HBM bandwidth: a lower bound on the bytes moved.
- tokens/s = batch * seq_len / max(compute, memory): what the chips could do at 100% of both
  peaks; real runs reach a fraction of it (measure on a TPU: `python -m pipeline.teacher_dump`
  prints tokens_per_s).
"""
from __future__ import annotations

# HBM bandwidth per chip (Google Cloud TPU documentation), keyed like train.aot.Chip.name.
HBM_BYTES_PER_S = {"v4": 1200e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}


def _visible_keys(seq_len: int, window: int | None) -> float:
    """Sum over query positions 0..T-1 of the keys each attends (causal, optional window)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) / 2
    # positions < window see p + 1 keys; the rest see `window`
    return window * (window + 1) / 2 + (seq_len - window) * window


def active_params(hf: dict) -> float:
    """Parameters one token passes through in the teacher's features forward: q/k/v/o, the
    router and its k experts' gate/up/down, every layer (no LM head: features only)."""
    h = int(hf["hidden_size"])
    nq, nkv = int(hf["num_attention_heads"]), int(hf["num_key_value_heads"])
    hd = int(hf.get("head_dim") or h // nq)
    inter = int(hf["intermediate_size"])
    experts = int(hf.get("num_local_experts", 1))
    k = int(hf.get("num_experts_per_tok") or hf.get("experts_per_token") or 1)
    per_layer = h * (nq + 2 * nkv) * hd + nq * hd * h + h * experts + k * 3 * h * inter
    return float(int(hf["num_hidden_layers"]) * per_layer)


def forward_flops(hf: dict, batch: int, run_len: int) -> float:
    """Model FLOPs (2 per multiply-add) of the teacher's features forward at [batch, run_len]."""
    h = int(hf["hidden_size"])
    nq = int(hf["num_attention_heads"])
    hd = int(hf.get("head_dim") or h // nq)
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["full_attention"] * layers
    window = hf.get("sliding_window")
    flops = 2 * active_params(hf) * batch * run_len
    for t in types:  # scores q.k and weighted sum p.v: 2 * 2 * hd per (query head, key)
        keys = _visible_keys(run_len, window if t == "sliding_attention" else None)
        flops += batch * keys * nq * 4 * hd
    return float(flops)


def teacher_roofline(hf: dict, batch: int, seq_len: int, run_len: int, layer_ids, chip,
                     chips: int, memory: dict) -> dict:
    """The estimate as report fields (empty when the chip's peak or bandwidth is unknown)."""
    flops = forward_flops(hf, batch, run_len)
    out = {"model_flops": flops}
    bandwidth = HBM_BYTES_PER_S.get(getattr(chip, "name", None))
    if chip is None or bandwidth is None:
        return out
    compute_s = flops / (chip.peak_bf16_flops * chips)
    feature_bytes = batch * seq_len * len(layer_ids) * int(hf["hidden_size"]) * 2 / chips
    weight_bytes = memory.get("arguments")
    memory_s = None if weight_bytes is None else (weight_bytes + feature_bytes) / bandwidth
    step_s = max(compute_s, memory_s or 0.0)
    out.update({"roofline_compute_s": compute_s, "roofline_memory_s": memory_s,
                "roofline_bound": "compute" if compute_s >= (memory_s or 0.0) else "memory",
                "roofline_tokens_per_s": batch * seq_len / step_s})
    return out
