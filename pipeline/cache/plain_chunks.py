"""Plain zarr3 chunk files of a TensorStore part, read without TensorStore.

The dump writes every array of a part with `PLAIN_CODECS` (uncompressed, unsharded), so on a local
filesystem a chunk is one little-endian C-order file: the loader preadv's a sequence's features
straight into its batch row (`plain_chunk_files`, `_pread_into`), and reads a part's small
one-chunk arrays (offsets, checksums) with one file read (`_small_plain_array`). Anything else
(other kvstores, older or other layouts) is left to TensorStore (pipeline/cache/ts_parts.py).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import xxhash

from pipeline.cache.format import BF16, CacheError

_HASH_BLOCK = 256 << 10  # preadv and hash 256 KiB at a time, hashed while still in L2 (1 MiB
# blocks cost 1.5x as much hashing CPU per GB on this host)

# Plain chunks: one little-endian C-order file per chunk. Without it TensorStore shards large
# chunks into [1024, 960] inner chunks, and a sequence's features are no longer one byte range.
PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]



def _plain_meta(root: str, part: str, array: str, dtype: str):
    """(directory, shape, chunk shape) of the part's `array` when it is a plain `dtype` zarr3
    array on a local filesystem (only the little-endian `bytes` codec, a regular grid, default
    "/" chunk keys, fill value 0), else None."""
    if not root.startswith("file://"):
        return None
    directory = Path(root[len("file://"):]) / part / array
    try:
        meta = json.loads((directory / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    grid, keys = meta.get("chunk_grid", {}), meta.get("chunk_key_encoding", {})
    shape, chunk = meta.get("shape"), grid.get("configuration", {}).get("chunk_shape")
    if (meta.get("codecs") != PLAIN_CODECS or meta.get("data_type") != dtype
            or grid.get("name") != "regular" or keys.get("name") != "default"
            or keys.get("configuration", {}).get("separator", "/") != "/"
            or not _is_positive_zero(meta.get("fill_value"))
            or not isinstance(shape, list) or not isinstance(chunk, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not all(isinstance(n, int) and n > 0 for n in chunk)):
        return None
    return directory, shape, chunk


def plain_chunk_files(root: str, part: str, array: str):
    """(directory, rows per chunk, bytes per row) when the part's bf16 [rows, F] `array` is
    stored as plain chunk files on a local filesystem (`_plain_meta`), else None (e.g. a sharded
    or compressed array, an older dump, a gs:// root). Row r of chunk c is then bytes
    [r * row_bytes, (r + 1) * row_bytes) of the file <directory>/c/<c>/0, and an absent chunk
    file holds zeros (zarr stores no chunk of fill values only)."""
    plain = _plain_meta(root, part, array, "bfloat16")
    if plain is None:
        return None
    directory, shape, chunk = plain
    if len(chunk) != 2 or len(shape) != 2 or chunk[1] != shape[1]:
        return None
    return directory, int(chunk[0]), int(chunk[1]) * BF16.itemsize


def _small_plain_array(root: str, part: str, array: str, dtype: str):
    """A part's small one-chunk array (offsets, checksums) read straight from its chunk file,
    ~0.05 ms against ~0.5 ms for a TensorStore open and read: nearly every record read of a
    shuffled epoch opens its part (4 records a part by default). None unless the array is a
    plain (`_plain_meta`), single-chunk `dtype` array; TensorStore reads the rest (other
    kvstores, other layouts, an absent array). A chunk file of the wrong size is a CacheError."""
    plain = _plain_meta(root, part, array, dtype)
    if plain is None:
        return None
    directory, shape, chunk = plain
    if len(shape) not in (1, 2) or chunk != shape:
        return None
    chunk = directory.joinpath("c", *["0"] * len(shape))
    want = math.prod(shape) * np.dtype(dtype).itemsize
    try:
        raw = chunk.read_bytes()
    except FileNotFoundError:  # zarr stores no chunk of fill values only
        return np.zeros(shape, dtype)
    if len(raw) != want:
        raise CacheError(f"{chunk} holds {len(raw)} bytes, its array needs {want} (corrupted "
                         "part)")
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def _is_positive_zero(value) -> bool:
    """The fill value whose bf16 bits are all zero (0.0, not -0.0)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
            and math.copysign(1.0, value) > 0)


def _pread_into(path: Path, out: np.ndarray, offset: int, hashed: bool = False):
    """Fill C-contiguous `out` with the file's bytes from `offset` (one copy, no buffer);
    with `hashed`, returns the xxh3_64 of those bytes, hashed block by block as they land."""
    view = out.reshape(-1).view(np.uint8)
    h = xxhash.xxh3_64() if hashed else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # a chunk of fill values only: zarr stores no file
        view[:] = 0
        return xxhash.xxh3_64_intdigest(view) if hashed else None
    try:
        done = 0
        while done < view.nbytes:
            block = view[done:done + _HASH_BLOCK] if h is not None else view[done:]
            n = os.preadv(fd, [block], offset + done)
            if n <= 0:
                raise CacheError(f"{path} ends before byte {offset + view.nbytes} (truncated)")
            if h is not None:
                h.update(block[:n])
            done += n
    finally:
        os.close(fd)
    return h.intdigest() if h is not None else None
