"""Render chat conversations with the tokenizer's chat template and mark the assistant's tokens.

Two ways to find what the assistant wrote:
  * templates with `{% generation %}` markers (ours, see pipeline.teacher.tokenizer): transformers'
    `apply_chat_template(return_assistant_tokens_mask=True)`;
  * any other template (e.g. a published gpt-oss snapshot's): render each assistant text replaced
    by a sentinel to find its characters in the full rendering, then map them to tokens by offsets.
Both mark the assistant's text plus the special token that ends it; tests check they agree.
"""
from __future__ import annotations

import re

from pipeline.errors import UserError

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def validate_messages(messages, where: str, require_assistant: bool = True) -> list[dict]:
    """Check a conversation's shape: a list of {role: str, content: str}, with an assistant turn
    unless require_assistant is False (a prompt to continue, not a training example)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"{where}: message {i} has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} ({m['role']}) has no string 'content'")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: conversation has no assistant turn (nothing to learn from)")
    return messages


def render_with_mask(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one conversation; loss_mask is 1 on assistant-written tokens."""
    template = tokenizer.chat_template
    if not template:
        raise UserError(f"{where}: chat data needs a tokenizer with a chat template; this one has none")
    try:
        if _GENERATION_TAG.search(template):
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
        else:
            ids, mask = _mask_by_sentinels(tokenizer, messages)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except Exception as e:  # jinja raises for conversations its template rejects
        raise UserError(f"{where}: the chat template cannot render this conversation ({e})") from None
    if not any(mask):
        raise UserError(f"{where}: rendering left no assistant tokens to learn from")
    return ids, mask


def _mask_by_sentinels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Locate each assistant text by rendering it replaced with a sentinel.

    prefix + SENTINEL + suffix vs prefix + content + suffix gives the content's exact span even
    when the template trims or escapes it; a special token right after it (<|end|>, <|return|>,
    <|im_end|>...) is what the assistant emits to stop, so it is supervised too.
    """
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)
    full = render(messages)
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                      key=len, reverse=True)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        for key in ("thinking", "content"):
            if key == "thinking" and not m.get(key):
                continue
            sentinel = f"\u2063DFLASH{i}{key}\u2063"
            probe = [dict(x) for x in messages]
            probe[i][key] = sentinel
            text = render(probe)
            p = text.find(sentinel)
            if p < 0:
                if key == "thinking":  # templates may drop the reasoning of earlier turns
                    continue
                raise UserError(f"the chat template does not render assistant message {i}'s content")
            end = len(full) - (len(text) - p - len(sentinel))
            if end < p or text[:p] != full[:p] or text[p + len(sentinel):] != full[end:]:
                raise UserError("the chat template renders assistant text in a way that cannot be located")
            end += next((len(t) for t in specials if full.startswith(t, end)), 0)
            spans.append((p, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
