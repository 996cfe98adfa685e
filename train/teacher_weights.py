"""Read only the teacher's input embedding and LM head from its safetensors snapshot.

A gpt-oss-120b snapshot is ~65 GB; the trainer needs two [V, H] tensors of it. The weights index
(`model.safetensors.index.json`) says which file holds each; `safe_open` reads just those bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from pipeline.errors import UserError

EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight")
HEAD_NAMES = ("lm_head.weight",)
INDEX_NAME = "model.safetensors.index.json"


def _weight_map(snapshot: Path) -> dict[str, str]:
    index = snapshot / INDEX_NAME
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise UserError(f"teacher snapshot {snapshot} has no safetensors weights")
    out = {}
    for f in files:  # unsharded snapshot: list the keys of each file (header only)
        with safe_open(str(f), framework="numpy") as fh:
            out.update({k: f.name for k in fh.keys()})
    return out


def _read(snapshot: Path, wmap: dict[str, str], names) -> np.ndarray | None:
    for name in names:
        if name in wmap:
            with safe_open(str(snapshot / wmap[name]), framework="numpy") as fh:
                return fh.get_tensor(name)
    return None


def load_embedding_and_head(snapshot: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (embedding [V, H], lm_head [V, H]) as stored (bf16 for GPT-OSS), nothing else read.

    With tie_word_embeddings (or no lm_head tensor) the head is the embedding.
    """
    snapshot = Path(snapshot)
    if not snapshot.is_dir():
        raise UserError(f"teacher snapshot {snapshot} (recorded in the cache manifest) not found")
    wmap = _weight_map(snapshot)
    embed = _read(snapshot, wmap, EMBED_NAMES)
    if embed is None:
        raise UserError(f"teacher snapshot {snapshot}: no embedding tensor ({EMBED_NAMES[0]})")
    cfg_path = snapshot / "config.json"
    tied = cfg_path.exists() and json.loads(cfg_path.read_text()).get("tie_word_embeddings", False)
    head = None if tied else _read(snapshot, wmap, HEAD_NAMES)
    return embed, (embed if head is None else head)
