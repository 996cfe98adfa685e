"""Read only the teacher's input embedding and LM head from its safetensors snapshot.

A gpt-oss-120b snapshot is ~65 GB; the trainer needs two [V, H] tensors of it. The weights index
(`model.safetensors.index.json`) says which file holds each; `model.safetensors_io` reads just
those bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.safetensors_io import read_safetensors
from pipeline.errors import UserError

EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight")
HEAD_NAMES = ("lm_head.weight",)


def _first(tensors: dict, names) -> np.ndarray | None:
    return next((tensors[n] for n in names if n in tensors), None)


def load_embedding_and_head(snapshot: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (embedding [V, H], lm_head [V, H]) as stored (bf16 for GPT-OSS), nothing else read.

    With tie_word_embeddings (or no lm_head tensor) the head is the embedding.
    """
    snapshot = Path(snapshot)
    if not snapshot.is_dir():
        raise UserError(f"teacher snapshot {snapshot} (recorded in the cache manifest) not found")
    cfg_path = snapshot / "config.json"
    tied = cfg_path.exists() and json.loads(cfg_path.read_text()).get("tie_word_embeddings", False)
    tensors = read_safetensors(snapshot, EMBED_NAMES + (() if tied else HEAD_NAMES))
    embed = _first(tensors, EMBED_NAMES)
    if embed is None:
        raise UserError(f"teacher snapshot {snapshot}: no embedding tensor ({EMBED_NAMES[0]})")
    head = None if tied else _first(tensors, HEAD_NAMES)
    return embed, (embed if head is None else head)
