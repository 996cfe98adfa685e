"""The one rule for how many tokens the teacher may see: every position the teacher runs (a dump's
--seq-len window; a prompt plus the tokens generated after it) must be below the snapshot's
`max_position_embeddings` (RoPE tables and the KV cache are sized by it; past it the model's
output is undefined, and nothing would say so). teacher_dump, regenerate and spec_decode check
their inputs with these functions before they write anything, so a prompt refused by one is
refused by the others with the same words.
"""
from __future__ import annotations

from pipeline.errors import UserError


def teacher_positions(hf_config) -> int | None:
    """max_position_embeddings of an HF config (dict or object), None when it sets none."""
    get = hf_config.get if isinstance(hf_config, dict) else (
        lambda k: getattr(hf_config, k, None))
    limit = get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_window(seq_len: int, limit: int | None) -> None:
    """A dump's packed windows of --seq-len tokens."""
    if limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the teacher's max_position_embeddings "
                        f"{limit}; pass --seq-len {limit} or less")


def check_prompt(where: str, prompt_tokens: int, max_new_tokens: int, limit: int | None) -> None:
    """A prompt of `prompt_tokens` tokens continued by up to `max_new_tokens` tokens."""
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        fix = f"shorten it to fewer than {limit} tokens (or drop it)"
    else:
        fix = f"lower --max-new-tokens to {limit - prompt_tokens} or shorten the prompt"
    raise UserError(f"{where}: the prompt's {prompt_tokens} tokens + --max-new-tokens "
                    f"{max_new_tokens} exceed the teacher's max_position_embeddings {limit}; {fix}")
