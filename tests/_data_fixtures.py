"""A small harmony tokenizer trained in seconds on a slice of the built-in corpus, for data tests."""
from __future__ import annotations

from pathlib import Path

from pipeline.data import corpus
from pipeline.teacher import tokenizer as tokenizer_build

SMALL_VOCAB = 1024


def small_tokenizer_texts(n_files: int = 40) -> list[str]:
    return [text for _, text in corpus.iter_texts("train")][:n_files]


def build_small_tokenizer(out_dir: Path):
    """Train, save and reload through transformers.AutoTokenizer (the path the dump uses)."""
    from transformers import AutoTokenizer

    tok = tokenizer_build.train_bpe(small_tokenizer_texts(), SMALL_VOCAB)
    tokenizer_build.save_tokenizer(tok, out_dir, model_max_length=1024)
    return AutoTokenizer.from_pretrained(str(out_dir))
