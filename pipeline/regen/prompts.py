"""Prompts for teacher regeneration, and the records that carry the teacher's answers to the dump.

Read with `pipeline.data.sequences.iter_records` (the dump's sources: jsonl / parquet / saved datasets /
text files / builtin corpus splits), so regeneration takes exactly what the dump takes.

  chat (`messages`)   the turns before the first assistant turn are the prompt; the teacher writes
                      the assistant turn. The prompt is the chat template's rendering of those
                      turns plus an assistant turn up to where its content starts (for harmony:
                      `<|start|>assistant<|channel|>final<|message|>`), found with a sentinel. The
                      record is {"messages" (the decoded turn appended), "prompt_ids",
                      "completion_ids" (the generated tokens, the end token included)}: the dump
                      takes the ids verbatim and supervises exactly the generated tokens (decoded
                      text need not re-encode to them, e.g. a cut inside a UTF-8 character).
  text                the first `prompt_tokens` tokens of the document are continued; the record
                      is {"prompt", "completion", "prompt_ids", "completion_ids"}: the dump takes
                      the ids verbatim and supervises the completion only.
  prompt/completion   (an earlier regeneration's output) its prompt is continued again.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from pipeline.data import sequences as data
from pipeline.errors import UserError

_SENTINEL = "\u2063DFLASH_REGENERATE\u2063"


@dataclasses.dataclass(frozen=True)
class Prompt:
    index: int  # position in the data (the sampling key and the output order)
    where: str  # file:line of the record, for error messages
    ids: list  # token ids the teacher continues
    kind: str  # "chat" or "text"
    context: object  # chat: the prompt messages; text: the prompt text


def prompt_records(source, limit: int | None = None):
    """[(where, kind, payload)] of the first `limit` records, every one validated before anything
    is generated (a bad line is an error before the first output file exists)."""
    out = []
    for rec in data.iter_records(source, require_assistant=False):
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{source}: no prompts (empty input)")
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def chat_prefix(tokenizer, messages: list[dict], where: str) -> str:
    """The rendering of `messages` followed by an assistant turn, cut where its content starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: chat prompts need a tokenizer with a chat template; this one has none")
    probe = messages + [{"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # jinja raises for conversations its template rejects
        raise UserError(f"{where}: the chat template cannot render this conversation ({e})") from None
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise UserError(f"{where}: the chat template does not render an assistant turn's content")
    return text[:cut]


def text_prompt_ids(tokenizer, text: str, prompt_tokens: int) -> list[int]:
    """The first `prompt_tokens` tokens of `text`. Only a prefix of the characters is encoded (a
    stdlib file is ~10k tokens); it is long enough when it yields well over `prompt_tokens`
    tokens, since a cut changes only the last pre-token word's tokens."""
    chars = 16 * prompt_tokens + 256
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= prompt_tokens + 32 or chars >= len(text):
            return ids[:prompt_tokens]
        chars *= 4


def build_prompt(tokenizer, index: int, record, prompt_tokens: int) -> Prompt:
    where, kind, payload = record
    if kind in ("chat", "chat_ids"):  # an earlier regeneration's chat: its user turns again
        payload = payload if kind == "chat" else payload[0]
        first = next((i for i, m in enumerate(payload) if m["role"] == "assistant"), len(payload))
        messages = [dict(role=m["role"], content=m["content"]) for m in payload[:first]]
        if not messages:
            raise UserError(f"{where}: the conversation opens with an assistant turn: no prompt")
        ids = _encode(tokenizer, chat_prefix(tokenizer, messages, where))
        return Prompt(index, where, ids, "chat", messages)
    if kind == "completion":
        ids = _encode(tokenizer, payload[0]) if isinstance(payload[0], str) else list(payload[0])
        if not ids:
            raise UserError(f"{where}: empty prompt")
        return Prompt(index, where, ids, "text", tokenizer.decode(ids))
    ids = text_prompt_ids(tokenizer, payload, prompt_tokens)
    return Prompt(index, where, ids, "text", tokenizer.decode(ids))


def iter_prompts(tokenizer, records, prompt_tokens: int, start: int = 0) -> Iterator[Prompt]:
    for i in range(start, len(records)):
        yield build_prompt(tokenizer, i, records[i], prompt_tokens)


def check_prompt_lengths(tokenizer, records, prompt_tokens: int, max_new_tokens: int,
                         positions: int | None) -> None:
    """Every prompt (chat, text, completion) plus --max-new-tokens fits the teacher's positions
    (pipeline/data/limits.py, the rule the dump and spec_decode apply): checked for all records
    before anything is generated or written, at the cost of rendering each prompt twice."""
    from pipeline.data.limits import check_prompt

    if positions is None:
        return
    for i, rec in enumerate(records):
        prompt = build_prompt(tokenizer, i, rec, prompt_tokens)
        check_prompt(prompt.where, len(prompt.ids), max_new_tokens, positions)


def output_record(tokenizer, prompt: Prompt, generated: list[int], stop_ids) -> dict:
    """The record the dump reads for one prompt and its generated tokens."""
    stopped = bool(generated) and generated[-1] in stop_ids
    finish = "stop" if stopped else "length"
    if prompt.kind == "chat":
        # The template writes the end token itself; the content is what came before it.
        content = tokenizer.decode(generated[:-1] if stopped else generated)
        return {"messages": prompt.context + [{"role": "assistant", "content": content}],
                "prompt_ids": list(prompt.ids), "completion_ids": list(generated),
                "finish_reason": finish}
    # The ids are what the dump reads (exact); the text is for people and other tools.
    return {"prompt": prompt.context, "completion": tokenizer.decode(generated),
            "prompt_ids": list(prompt.ids), "completion_ids": list(generated),
            "finish_reason": finish}
