"""Resolve `--model` to a local HF snapshot directory, offline.

Accepted: "tiny" (the embedded miniature GPT-OSS, built on first use by tools.make_tiny_teacher),
a snapshot directory (config.json + weights), or an HF repo id found in the local HF cache
($HF_HUB_CACHE, else $HF_HOME/hub, HF_HOME defaulting to /dev/shm/hf). Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError

DEFAULT_MODEL = "openai/gpt-oss-20b"
TINY = "tiny"
DEFAULT_HF_HOME = "/dev/shm/hf"


def hub_cache_dir() -> Path:
    """The HF hub cache that repo ids are looked up in."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or DEFAULT_HF_HOME).expanduser() / "hub"


def _is_snapshot(path: Path) -> bool:
    return (path / "config.json").is_file()


def _cached_snapshot(repo_id: str, hub: Path) -> tuple[Path | None, Path]:
    """(snapshot dir or None, the repo dir searched) for `org/name` in an HF hub cache."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():  # the revision `main` pointed to when it was downloaded
        pinned = snapshots / ref.read_text().strip()
        if _is_snapshot(pinned):
            return pinned, repo_dir
    candidates = [p for p in snapshots.glob("*") if _is_snapshot(p)] if snapshots.is_dir() else []
    if candidates:
        return max(candidates, key=lambda p: p.stat().st_mtime), repo_dir
    return None, repo_dir


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """Return the snapshot directory for `--model`; raise UserError naming what was searched."""
    name = str(name_or_path)
    if name == TINY:
        from pipeline.teacher.tiny import ensure_tiny_teacher  # torch: imported only for "tiny"

        return Path(ensure_tiny_teacher())
    path = Path(name).expanduser()
    if path.is_dir():
        if not _is_snapshot(path):
            raise UserError(f"--model {name}: directory has no config.json, so it is not an HF "
                            "snapshot; pass a snapshot directory, a cached repo id, or `tiny`")
        return path.resolve()
    searched = [f"directory {path}"]
    if _looks_like_repo_id(name):
        snapshot, repo_dir = _cached_snapshot(name, hub_cache_dir())
        if snapshot is not None:
            return snapshot
        searched.append(f"HF cache {repo_dir}/snapshots (HF_HOME/HF_HUB_CACHE; offline)")
    raise UserError(f"--model {name}: not found (searched {'; '.join(searched)}); "
                    "use --model tiny for the built-in miniature GPT-OSS teacher")


# Pickled weight files (torch.load): never loaded; a snapshot with only these is refused.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def read_config(path: Path) -> dict:
    """The snapshot's config.json as a dict, or one UserError line (missing, not JSON, not an
    object, or not a GPT-OSS config with the fields the teacher needs)."""
    import json

    cfg_path = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} has no config.json: not a model snapshot") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} is not a JSON object")
    if cfg.get("model_type") != "gpt_oss":
        raise UserError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not gpt_oss; the "
                        "teacher (and its EasyDeL fixes) is GPT-OSS only")
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise UserError(f"{cfg_path}: {key} is {cfg.get(key)!r}, expected a positive integer")
    return cfg


def check_weights(path: Path) -> None:
    """Refuse a snapshot whose weights are not all safetensors files on disk: no pickle (a
    pytorch_model.bin) is ever loaded, and a missing file is named before anything runs."""
    import json

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_bytes())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e})") from None
        from model.paths import inside
        for f in files:  # a name like ../../x would read weights from outside the snapshot
            inside(path, f, index.name)
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise UserError(f"{path}: weight file(s) named by {index.name} are missing: "
                            f"{', '.join(missing[:3])}")
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise UserError(f"{path} holds only pickled weights ({', '.join(pickles[:3])}): they are "
                        "never loaded (a pickle can run code); convert the snapshot to safetensors")
    raise UserError(f"{path} has no weights (no *.safetensors file): not a complete snapshot")
