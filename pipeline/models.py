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
        from tools.make_tiny_teacher import ensure_tiny_teacher

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
