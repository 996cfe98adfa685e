"""The project's one safetensors reader: a snapshot or export directory, single-file or sharded.

Used by model.io (drafts), the cached target (pipeline/speculative/target.py) and the trainer's
embedding / LM-head read (train/teacher_weights.py). Tensors come back as stored (numpy; bf16
through ml_dtypes); callers cast. With `names`, only those tensors' bytes are read: a 65 GB
gpt-oss-120b snapshot gives its two [V, H] tensors without touching the experts.

A file that cannot be read (truncated, overwritten, not safetensors) or a broken index is the
user's file, not our bug: one CheckpointError line naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.errors import CheckpointError, UserError
from model.paths import inside

INDEX_NAME = "model.safetensors.index.json"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _unreadable(f: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt: "
                           f"{_first_line(e)})")


def weight_map(path) -> dict[str, str]:
    """Tensor name -> file name (relative to `path`): from the sharded index when there is one,
    else from each *.safetensors file's header (no tensor bytes read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError(f"weight_map is a {type(wmap).__name__}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({_first_line(e)})") from None
        for v in set(wmap.values()):  # every file it names must lie in the snapshot
            inside(path, v, index.name)
        return {str(k): str(v) for k, v in wmap.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as fh:
                out.update({k: f.name for k in fh.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(f, e) from None
    return out


def read_safetensors(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of the directory `path` as numpy arrays: all of them, or only those of `names`
    that exist (the caller decides whether a missing one is an error)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    wmap = weight_map(path)
    wanted = list(wmap) if names is None else [n for n in names if n in wmap]
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(wmap[name], []).append(name)
    out = {}
    for fname, keys in sorted(by_file.items()):
        f = path / fname
        try:
            with safe_open(str(f), framework="numpy") as fh:
                for k in keys:
                    out[k] = fh.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(f, e) from None
    return out
