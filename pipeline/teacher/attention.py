"""Which EasyDeL attention the teacher's forward uses, and the sequence length it needs.

    mech = resolve_attention("auto", "tpu")           # "blocksparse"
    length = run_length(3000, mech, block=512, max_positions=131072)   # 3072: pad 72 on the right

- `blocksparse` (EasyDeL BlockSparseAttn -> ejkernel `blocksparse_attention`): splash attention,
  scores computed block by block, never the [b, heads, T, T] matrix. It handles GPT-OSS's two
  attention features (read in easydel 0.3.0 / ejkernel 0.0.78): the per-head sinks (EasyDeL
  passes `softmax_aux` flattened to [num_heads]; the TPU Pallas kernel starts each head's
  running max at its sink and its sum at 1, i.e. the sink joins the softmax and adds no value;
  the XLA version appends the sink as an extra logit column) and the sliding window (a
  LocalMask & CausalMask keeping q - W <= k <= q, the same W + 1 convention as EasyDeL's vanilla
  path, so fixes.fix_sliding_window serves both). On CPU ejkernel runs its XLA version (dense,
  the same semantics): that is what the CPU tests compare with HF torch.
- It silently falls back to `vanilla` unless the query and key lengths are multiples of the
  config's `blocksize_q` / `blocksize_k` (512 by default): `run_length` pads T up to that
  multiple. Right padding cannot change the real positions under causal attention (no query
  sees a later key) and the MoE routes each token alone (no capacity limit), so the features of
  positions < T are those of the unpadded forward (tests/test_teacher_attention.py).
- `vanilla` materialises the float32 scores [b, kv, groups, T, T+1]: 19.4 GB at batch 8, T=3072
  for gpt-oss-20b, the reason the dump used to fit a v5e-8 only at batch 2.
- Never `flash_attn2` or `ring`: they mishandle per-head sinks (errors ~1.0, issue 20).

GPU: ejkernel dispatches `blocksparse_attention` on an NVIDIA GPU to its CUDA kernel, whose
wrapper reads a [num_heads] softmax_aux as one sink per head; its Triton kernel (chosen when the
CUDA one is not registered) reads the same array as num_heads sinks SHARED by every head (and
loads only 16 of them), which is wrong for GPT-OSS. So "auto" takes blocksparse on a GPU only
when the dispatch is the CUDA kernel; no GPU was available to run it (docs/TPU.md).
"""
from __future__ import annotations

from pipeline.errors import UserError

ATTENTIONS = ("auto", "blocksparse", "vanilla")  # what --attention accepts
DEFAULT_BLOCK = 512  # EasyDeL's default blocksize_q / blocksize_k


def gpu_blocksparse_dispatch() -> str:
    """The ejkernel platform `blocksparse_attention` runs on for the current GPU backend."""
    from ejkernel.modules.base import detect_platform

    platform = detect_platform("blocksparse_attention", "auto")
    return str(getattr(platform, "value", platform))


def resolve_attention(name: str, platform: str) -> str:
    """The EasyDeL attn_mechanism for --attention `name` on `platform` (cpu, tpu, gpu/cuda/rocm).

    auto: blocksparse on TPU, and on a GPU whose dispatch is ejkernel's CUDA kernel (module
    docstring); vanilla otherwise (on CPU both are dense; vanilla is the cheaper one).
    """
    if name not in ATTENTIONS:
        raise UserError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {name!r}")
    if name != "auto":
        return name
    if platform == "tpu":
        return "blocksparse"
    if platform in ("gpu", "cuda", "rocm"):
        return "blocksparse" if gpu_blocksparse_dispatch() == "cuda" else "vanilla"
    return "vanilla"


def run_length(seq_len: int, attention: str, *, block: int = DEFAULT_BLOCK,
               max_positions: int | None = None) -> int:
    """The length the forward runs at: seq_len, or for blocksparse seq_len rounded up to a
    multiple of `block` (EasyDeL would otherwise fall back to vanilla without a word).
    One UserError line when the padded length exceeds the model's positions."""
    if attention != "blocksparse" or seq_len % block == 0:
        return seq_len
    padded = -(-seq_len // block) * block
    if max_positions is not None and padded > max_positions:
        raise UserError(
            f"--seq-len {seq_len} runs as {padded} tokens under blocksparse attention (a multiple "
            f"of its block {block}), beyond the teacher's max_position_embeddings "
            f"{max_positions}; use a --seq-len that is a multiple of {block}, or --attention "
            "vanilla")
    return padded
