"""Prompts for the speculative-decoding harness, as token-id lists.

Sources:
  builtin       code prompts cut from the held-out split of the built-in corpus (stdlib files the
                tiny teacher never trained on) plus a few HumanEval-style function stubs.
  <file.jsonl>  one JSON object per line with `prompt` (plain text), `messages` (a chat, rendered
                with the teacher tokenizer's chat template, generation prompt appended) or
                `input_ids` (token ids, used as given).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.chat import validate_messages
from pipeline.errors import UserError

HUMANEVAL_LIKE = (
    'def has_close_elements(numbers: list[float], threshold: float) -> bool:\n'
    '    """Return True if any two numbers are closer to each other than threshold."""\n',
    'def count_words(text: str) -> dict[str, int]:\n'
    '    """Count how often each whitespace-separated word occurs in text."""\n    counts = {}\n',
    'class Stack:\n    """A last-in first-out stack."""\n\n    def __init__(self):\n',
)


def builtin_texts(n: int = 8, chars: int = 400) -> list[str]:
    """Deterministic held-out code snippets (first `chars` characters of held-out stdlib files)."""
    from pipeline.data import corpus

    texts = list(HUMANEVAL_LIKE)
    for _, text in corpus.iter_texts("heldout"):
        snippet = text.strip()[:chars]
        if len(snippet) >= chars // 2:
            texts.append(snippet)
        if len(texts) >= n:
            break
    return texts[:n]


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {e}".splitlines()[0]) from None


def _encode(tok, text: str) -> list[int]:
    if tok is None:
        raise UserError("text prompts need a teacher with a tokenizer; give `input_ids` instead")
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _token_ids(value, where: str) -> list[int]:
    # bool is an int subclass and int(1.7) == 1: both would be silent corruption of the prompt
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in value):
        raise UserError(f"{where}: `input_ids` must be a list of integer token ids")
    return list(value)


def load_prompts(source: str, tokenizer, *, limit: int | None = None,
                 vocab_size: int | None = None, positions: int | None = None,
                 max_new_tokens: int = 0) -> list[list[int]]:
    """Token-id prompts from `builtin` or a jsonl file (see module doc). With vocab_size, every
    id must be < vocab_size (an embedding lookup in JAX clamps out-of-range ids silently); with
    positions, each prompt plus `max_new_tokens` must fit them (pipeline/data/limits.py)."""
    from pipeline.data.limits import check_prompt

    if source == "builtin":
        out = [_encode(tokenizer, t) for t in builtin_texts()]
        where = ["builtin"] * len(out)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"prompts file not found: {source} (give a .jsonl file or 'builtin')")
        out, where = [], []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON lines") from None
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{no}: expected an object with prompt/messages/input_ids")
            if "input_ids" in row:
                ids = _token_ids(row["input_ids"], f"{path}:{no}")
            elif "messages" in row:
                msgs = validate_messages(row["messages"], f"{path}:{no}", require_assistant=False)
                if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                    raise UserError(f"{path}:{no}: chat messages need a tokenizer with a chat template")
                text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                ids = _encode(tokenizer, text)
            elif "prompt" in row:
                ids = _encode(tokenizer, str(row["prompt"]))
            else:
                raise UserError(f"{path}:{no}: needs a `prompt`, `messages` or `input_ids` key")
            if not ids:
                raise UserError(f"{path}:{no}: empty prompt")
            out.append(ids)
            where.append(f"{path}:{no}")
    if not out:
        raise UserError(f"no prompts in {source}")
    for ids, at in zip(out, where):
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise UserError(f"{at}: token ids {bad[:5]} outside the teacher's vocabulary "
                            f"(0..{'?' if vocab_size is None else vocab_size - 1})")
    out, where = (out[:limit], where[:limit]) if limit else (out, where)
    for ids, at in zip(out, where):
        check_prompt(at, len(ids), max_new_tokens, positions)
    return out
