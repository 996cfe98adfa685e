"""Shared pieces of the `tools/bench_*.py` scripts: machine facts, timing, the result table and
JSON line every bench prints, and synthetic feature caches written through the dump's own writer.

Every bench ends with one line `BENCH_JSON {...}` (machine-readable; docs/BENCHMARKS.md quotes it).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

GPT_OSS_20B = {"hidden": 2880, "num_features": 5, "seq_len": 3072, "anchors": 512,
               "block": 8, "vocab": 201_088, "layers": 24}


def machine() -> dict:
    """What the numbers were measured on (CPU model, cores, load, date)."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeat` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, columns: list[str], rows: list[dict], summary: dict) -> dict:
    """Print an aligned table of rows (dicts keyed by columns) and the one JSON line."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print(f"\n== {name} ==")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    out = {"bench": name, "machine": machine(), "rows": rows, **summary}
    print("BENCH_JSON " + json.dumps(out, default=_jsonable), flush=True)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return "" if v is None else str(v)


def _jsonable(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return str(v)


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under path."""
    apparent = allocated = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def synthetic_sequences(n: int, seq_len: int, feature_dim: int, seed: int = 0):
    """n deterministic (ids int32 [T], mask uint8 [T], features bf16 [T, F]) with a prompt prefix
    unsupervised (~30%). Features are random bf16 bit patterns (finite: exponent capped) sliced
    from one pool, so making 100s of MB costs a copy, not a normal-distribution draw."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    pool_len = seq_len * feature_dim + 4096
    pool = rng.integers(0, 2**16, pool_len, dtype=np.uint16) & np.uint16(0xBFFF)  # no inf/nan
    for i in range(n):
        r = np.random.default_rng([seed, i])
        ids = r.integers(0, 200_000, seq_len, dtype=np.int32)
        mask = np.zeros(seq_len, np.uint8)
        mask[int(r.integers(seq_len // 10, seq_len // 3)):] = 1
        off = int(r.integers(0, 4096))
        feats = pool[off:off + seq_len * feature_dim].view(ml_dtypes.bfloat16)
        yield ids, mask, feats.reshape(seq_len, feature_dim)


def write_synthetic_cache(out: Path, n: int, seq_len: int, hidden: int, num_features: int,
                          *, shards: int = 4, commit_every: int = 16, seed: int = 0,
                          fmt: str = "arrayrecord"):
    """A complete cache written by the dump's own CacheWriter (same files a dump makes), in
    `fmt` ("arrayrecord" or "tensorstore" parts)."""
    from pipeline.cache import CacheManifest, encode_record, prepare_cache

    out = Path(out)
    manifest = CacheManifest(
        seq_len=seq_len, hidden_size=hidden, layer_ids=tuple(range(1, num_features + 1)),
        shards=shards, commit_every=commit_every,
        teacher={"path": "synthetic", "seed": seed}, mask_token_id=200_000, vocab_size=201_088,
        settings={"synthetic": True, "n": n}, format=fmt)
    prepared = prepare_cache(out, manifest, overwrite=True)
    for ids, mask, feats in synthetic_sequences(n, seq_len, hidden * num_features, seed):
        prepared.writer.write(encode_record(ids, mask, feats))
    return prepared.writer.finish()


def scratch_dir(root: str, name: str) -> Path:
    """A fresh directory root/name (removed first if present)."""
    path = Path(root) / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
