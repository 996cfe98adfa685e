"""A small byte-level BPE tokenizer with GPT-OSS's harmony special tokens and chat template.

The tiny teacher must look like gpt-oss to every consumer: the same special-token names (so the
harmony chat format renders), a real vocabulary id reserved for the DFlash mask token (gpt-oss
uses 200000), and a chat template that transformers' `apply_chat_template` can render with
assistant masks. Byte-level BPE means any text is encodable, with no unknown token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError

# Names as in gpt-oss's o200k_harmony vocabulary. Trained BPE gives special tokens the first ids,
# in this order; `<|mask|>` is ours (gpt-oss reserves id 200000 for it, a `<|reserved_...|>` slot).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
    "<|mask|>",
)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN = "<|startoftext|>", "<|return|>", "<|endoftext|>", "<|mask|>"
DEFAULT_VOCAB_SIZE = 4096

# Harmony rendering (gpt-oss): `<|start|>{role}<|message|>{content}<|end|>` per message; an
# assistant reply goes to the `final` channel (its optional `thinking` to `analysis`), and the
# last assistant reply ends with `<|return|>` as in gpt-oss training data. What the assistant
# writes — its content and the end token that stops it — sits in `{% generation %}` so that
# `apply_chat_template(return_assistant_tokens_mask=True)` yields the loss mask. The headers
# (`<|start|>assistant<|channel|>final<|message|>`) are prompt-side formatting and stay unmasked.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if message.get('thinking') -%}"
    "<|start|>assistant<|channel|>analysis<|message|>"
    "{% generation %}{{ message['thinking'] }}<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "<|start|>assistant<|channel|>final<|message|>"
    "{% generation %}{{ message['content'] }}"
    "{%- if loop.last -%}<|return|>{%- else -%}<|end|>{%- endif -%}"
    "{% endgeneration %}"
    "{%- else -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE (a `tokenizers.Tokenizer`) of exactly `vocab_size` ids on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2 style split (no prefix space, so "def" at a line start is the same token everywhere).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No offset-trimming post-processor: raw offsets keep a token's leading space inside its span,
    # which is what char->token lookups for assistant masks need.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise UserError(f"corpus too small: BPE learned {tok.get_vocab_size()} ids, wanted {vocab_size}")
    return tok


def special_token_ids(tok) -> dict[str, int]:
    """Ids of bos/eos/pad/mask for config.json and tokenizer_config.json."""
    return {
        "bos_token_id": tok.token_to_id(BOS_TOKEN),
        "eos_token_id": tok.token_to_id(EOS_TOKEN),
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
        "mask_token_id": tok.token_to_id(MASK_TOKEN),
    }


def save_tokenizer(tok, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (with chat_template and mask_token_id)."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    # The template and mask id also go into tokenizer_config.json itself: readers that only parse
    # that file (as for gpt-oss snapshots) find them there, and AutoTokenizer accepts both places.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["mask_token_id"] = tok.token_to_id(MASK_TOKEN)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
