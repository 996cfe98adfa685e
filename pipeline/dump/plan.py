"""Will the cache fit? The size of a dump before it starts, and the refusal of one that cannot.

    python -m pipeline.teacher_dump --plan --model openai/gpt-oss-20b --data chats.jsonl

A record is seq_len * (4 + 1 + 2 * K * H) bytes (int32 ids, uint8 mask, bf16 features:
pipeline/cache/format.py), 28.8 KB per gpt-oss-20b token, so the cache's size is the number of
sequences times that. `plan` counts the sequences (it tokenizes --data, as the dump will) and
compares the size with the free space of the filesystem the cache would be written to.
`check_fits` is the dump's own guard: it first tries an upper bound on the sequences (--max-seqs,
and for text and jsonl the file sizes: `sequences_bound`), and counts only when the bound does
not fit (tokenizing a large data set takes a while: ~3.3M tokens in 12 CPU s here). A TensorStore --kvstore (gs://...) has
no local free space to compare with and is not checked.
"""
from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

from pipeline.cache.format import record_nbytes
from pipeline.errors import UserError

GB = 1e9


def _existing_dir(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _bytes_in(path: Path) -> int:
    """Bytes already in an existing cache directory (a resumed dump only adds the rest)."""
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(out) -> int:
    """Free space of the filesystem `out` is (or would be) on."""
    return shutil.disk_usage(_existing_dir(Path(out))).free


def count_sequences(sequences, limit: int | None) -> int:
    return sum(1 for _ in itertools.islice(sequences, limit))


def sequences_bound(data, seq_len: int) -> int | None:
    """An upper bound on the sequences of text and jsonl data, from file sizes alone: every
    token of text is at least one byte of the file (BPE), every added token (a document's
    `<|endoftext|>`, a chat template's markers, an id written out in JSON) is paid for by at
    least one byte of the file or is the one separator of its file, and each file's final row
    may be a padded partial one. None (count instead) for the built-in corpus, parquet and
    saved datasets (compressed: fewer bytes than tokens)."""
    from pipeline.data.sequences import resolve_source

    kinds = resolve_source(data)
    if any(kind not in ("text", "jsonl") for kind, _ in kinds):
        return None
    nbytes = sum(Path(loc).stat().st_size for _, loc in kinds)
    return (nbytes + len(kinds)) // seq_len + len(kinds)


def plan(config, manifest, sequences) -> dict:
    """{sequences, tokens, bytes, free_bytes, fits, out}: what the dump of `sequences` (the
    dump's own rows) into config.out would take."""
    n = count_sequences(sequences, config.max_seqs)
    per = record_nbytes(manifest.seq_len, manifest.feature_dim)
    need = n * per
    local = not config.kvstore
    free = free_bytes(config.out) + _bytes_in(Path(config.out)) if local else None
    return {"sequences": n, "tokens": n * manifest.seq_len, "bytes": need,
            "bytes_per_token": per // manifest.seq_len,
            "free_bytes": free, "fits": (need <= free) if local else None,
            "out": str(Path(config.out).resolve()) if local else config.kvstore}


def describe(p: dict) -> str:
    free = "unknown (remote --kvstore)" if p["free_bytes"] is None else f"{p['free_bytes'] / GB:.2f} GB"
    fits = {True: "fits", False: "DOES NOT FIT", None: "not checked"}[p["fits"]]
    return (f"{p['sequences']} sequences, {p['tokens']} tokens, cache {p['bytes'] / GB:.2f} GB "
            f"({p['bytes_per_token']} bytes/token), free at {p['out']}: {free}: {fits}")


def refusal(p: dict, per_seq: int) -> str:
    fit = max(0, int(p["free_bytes"] // per_seq)) if p["free_bytes"] else 0
    return (f"the cache will not fit: {p['sequences']} sequences x {per_seq / 1e6:.1f} MB = "
            f"{p['bytes'] / GB:.2f} GB, {p['free_bytes'] / GB:.2f} GB free at {p['out']}; pass "
            f"--max-seqs {fit} (or less), --out on a larger disk, or train online without a "
            "cache: python -m train.main --teacher MODEL --data DATA")


def check_fits(config, manifest, sequences_fn) -> None:
    """Refuse, in one line, a dump whose cache cannot fit where it would be written (before
    anything is written). `sequences_fn()` gives a fresh iterator of the dump's rows."""
    if config.kvstore:
        return
    per = record_nbytes(manifest.seq_len, manifest.feature_dim)
    free = free_bytes(config.out) + _bytes_in(Path(config.out))
    bound = sequences_bound(config.data, manifest.seq_len)
    if config.max_seqs is not None:
        bound = config.max_seqs if bound is None else min(bound, config.max_seqs)
    if bound is not None and bound * per <= free:
        return  # even the upper bound fits: no need to tokenize everything first
    p = plan(config, manifest, sequences_fn())
    if not p["fits"]:
        raise UserError(refusal(p, per))
