"""The built-in offline corpus: the Python standard library source of the running interpreter.

It is real text that every machine running this project has, needs no download, and is large
enough (~12 MB without the test suites) to train the tiny teacher and feed a demo dump.
File order is deterministic (sorted relative POSIX paths) and the held-out split is chosen by a
hash of the relative path, so adding or removing one file never moves another between splits.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

# Test suites hold deliberately broken or odd-encoded files and would dominate the text with
# repetitive assertions; installed third-party packages are not "the standard library".
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
HELDOUT_MODULUS = 20  # ~5% of files are held out
SPLITS = ("all", "train", "heldout")


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def is_heldout(rel: str) -> bool:
    """Held-out membership of a file, from its relative path only (stable across machines)."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def corpus_files(split: str = "all", root: Path | None = None) -> list[Path]:
    """Sorted files of the corpus in `split` ("all", "train" or "heldout").

    Default: the stdlib's .py files minus test suites. With `root`: every .py/.txt file under it.
    """
    if split not in SPLITS:
        raise UserError(f"unknown corpus split {split!r}; expected one of {', '.join(SPLITS)}")
    suffixes, excluded = (".py",), EXCLUDED_DIRS
    if root is None:
        root = stdlib_root()
    else:
        root, suffixes, excluded = Path(root), (".py", ".txt"), frozenset({"__pycache__"})
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]  # prune: never walk site-packages
        for name in filenames:
            path = Path(dirpath, name)
            if path.suffix in suffixes and path.is_file():
                rel = path.relative_to(root).as_posix()
                if split == "all" or (split == "heldout") == is_heldout(rel):
                    found.append((rel, path))
    if not found:
        raise UserError(f"corpus is empty: no {'/'.join(suffixes)} files for split {split!r} under {root}")
    return [path for _, path in sorted(found)]


def iter_texts(split: str = "all", root: Path | None = None) -> Iterator[tuple[Path, str]]:
    """(path, text) of each corpus file in order; files that are not UTF-8 are skipped.

    Skipping (not failing) is right here: this corpus is ours, not user input, and a stdlib with a
    legacy-encoded file must still build the same teacher on every run.
    """
    for path in corpus_files(split, root):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield path, text


def corpus_fingerprint(split: str = "all", root: Path | None = None) -> str:
    """sha256 over relative paths and contents: two builds with equal fingerprints saw equal text."""
    root_path = stdlib_root() if root is None else Path(root)
    digest = hashlib.sha256()
    for path, text in iter_texts(split, root):
        digest.update(path.relative_to(root_path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()
