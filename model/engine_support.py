"""What a serving engine runs differently from the draft a config describes, per engine.

Only vLLM TPU (`tpu-inference` 0.32.0, its DFlashForCausalLM) for now; each finding was seen
in its own code run on our exports (tests/test_tpu_inference.py, which checks this list
against it). Two kinds:
- blocking: the engine cannot load or run the draft at all;
- divergent: it runs, but computes another model than the one trained.
"""
from __future__ import annotations

from model.config import DraftConfig

TPU_INFERENCE = "tpu-inference 0.32.0"


def tpu_inference_findings(config: DraftConfig) -> tuple[list[str], list[str]]:
    """(blocking, divergent) for vLLM TPU's DFlash draft model."""
    blocking, divergent = [], []
    if config.head_dim == 64:
        blocking.append("head_dim 64 runs on its hd64 attention kernel, which has no "
                        "bidirectional attention (DFlash's block attention)")
    elif config.head_dim % 128:
        blocking.append(f"head_dim {config.head_dim} is padded to a multiple of 128 but "
                        "q_norm/k_norm are not, so the draft fails to run")
    if config.attention_bias:
        blocking.append("its DFlash model has no attention biases (the loader rejects "
                        "*_proj.bias)")
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    if sliding and config.sliding_window is not None:
        divergent.append(f"layers {sliding} slide over {config.sliding_window} positions; it "
                         "runs every layer as full bidirectional attention")
    elif sliding or config.is_causal:
        layers = sliding if not config.is_causal else list(range(config.num_hidden_layers))
        divergent.append(f"layers {layers} are causal; it runs every layer as full "
                         "bidirectional attention")
    divergent.append(f"RoPE: it runs theta 1e6 with Llama-3-style x8 scaling (transformers 5 "
                     f"configs have no rope_theta attribute), not theta {config.rope_theta:g} "
                     f"({dict(config.rope_scaling or ()).get('rope_type', 'default')})")
    return blocking, divergent
