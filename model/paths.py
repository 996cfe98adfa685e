"""Names read from files (a manifest's parts, a ledger's parts, a weights index's file names) are
joined to the directory the file describes; each must stay inside it. A hostile or corrupted file
naming `../../elsewhere/x` or `/etc/x` would otherwise make a reader open (or a resume delete)
files outside that directory. The check is lexical, not `resolve()`: an HF hub snapshot's files
are symlinks into ../../blobs, which is where they are meant to point.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from model.errors import UserError


def inside(directory, name, what: str) -> Path:
    """directory / name, or one UserError line when `name` (read from `what`) is not a relative
    path below `directory` (absolute, `..`, empty, NUL, backslash)."""
    ok = isinstance(name, str) and name and "\x00" not in name and "\\" not in name
    parts = PurePosixPath(name).parts if ok else ()
    if not ok or PurePosixPath(name).is_absolute() or ".." in parts or not parts:
        raise UserError(f"{what} names {name!r}, which is not a file inside {directory}; "
                        "the file is corrupted or hostile, and nothing outside is read")
    return Path(directory) / name
