"""Shared helpers of the dump/cache tests: a cheap deterministic stand-in teacher, synthetic
sequences, a subprocess runner of the real CLI (`pipeline.teacher_dump.main`) with the stand-in
injected, and comparison of two caches record by record.

Run as `python -m tests._dump_fixtures --fake-n N --fake-hidden H -- <teacher_dump flags>`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class FakeTeacher:
    """Causal-ish features: layer l of token t mixes the token ids up to t, so a feature depends
    on its position, its prefix and the layer; exact and deterministic (jitted jax, bf16 out)."""

    def __init__(self, hidden_size: int = 16, num_layers: int = 6):
        import jax
        import jax.numpy as jnp

        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.identity = {"path": "fake-teacher", "hidden": hidden_size, "layers": num_layers}
        self.config = {"num_hidden_layers": num_layers, "hidden_size": hidden_size,
                       "vocab_size": 1000, "mask_token_id": 999}
        self.tokenizer_path = "fake-tokenizer"
        freq = jnp.arange(1, hidden_size + 1, dtype=jnp.float32) / hidden_size

        def features(ids, attention_mask, layers):
            x = ids.astype(jnp.float32)[..., None] * freq  # [b, T, H]
            prefix = jnp.cumsum(jnp.sin(x), axis=1) * attention_mask[..., None]
            outs = [jnp.cos(prefix * (l + 1) + x) for l in layers]
            return jnp.concatenate(outs, axis=-1).astype(jnp.bfloat16)

        self._features = jax.jit(features, static_argnums=2)
        self.calls = 0

    def features(self, input_ids, attention_mask, layer_ids):
        self.calls += 1
        return self._features(input_ids, attention_mask, tuple(layer_ids))


def fake_sequences(n: int, seq_len: int, seed: int = 0):
    """n deterministic (input_ids int32 [T], loss_mask uint8 [T]); sequence i is the same for
    every n and every run."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield (rng.integers(0, 1000, seq_len, dtype=np.int32),
               (rng.random(seq_len) < 0.7).astype(np.uint8))


def assert_same_cache(a, b) -> None:
    """Every record of cache dirs a and b equal, in order, and every part byte-identical:
    the committed size and CRC32 of each part (TensorStore: of every key and value under it),
    and for ArrayRecord also the record bytes and the files themselves."""
    from pipeline.cache import open_cache

    ra, rb = open_cache(a, verify=True), open_cache(b, verify=True)
    assert ra.manifest.format == rb.manifest.format
    assert len(ra) == len(rb) > 0
    assert [(p.file, p.records, p.bytes, p.crc32) for p in ra.parts] == \
           [(p.file, p.records, p.bytes, p.crc32) for p in rb.parts]
    for i in range(len(ra)):
        x, y = ra[i], rb[i]
        for k in ("input_ids", "loss_mask", "features"):
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (i, k)
            assert x[k].tobytes() == y[k].tobytes(), f"record {i} {k} differs"
    if ra.manifest.format == "arrayrecord":
        for i in range(len(ra)):
            assert ra.read_bytes(i) == rb.read_bytes(i), f"record {i} differs"
        for pa, pb in zip(ra.paths, rb.paths):
            assert Path(pa).read_bytes() == Path(pb).read_bytes(), f"{pa} differs from {pb}"


def run_fake_cli(args: list[str], n: int, hidden: int = 16, kill: str | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the dump CLI in a subprocess with the stand-in teacher (optionally a kill hook)."""
    env = dict(os.environ)
    env.pop("DFLASH_DUMP_KILL", None)
    if kill:
        env["DFLASH_DUMP_KILL"] = kill
    cmd = [sys.executable, "-m", "tests._dump_fixtures", "--fake-n", str(n),
           "--fake-hidden", str(hidden), "--", *args, "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fake-n", type=int, required=True)
    p.add_argument("--fake-hidden", type=int, default=16)
    a, rest = p.parse_known_args()
    rest = [r for r in rest if r != "--"]
    from pipeline import teacher_dump

    config = teacher_dump.parse_args(rest)
    return teacher_dump.main(rest, teacher=FakeTeacher(a.fake_hidden),
                             sequences=fake_sequences(a.fake_n, config.seq_len))


if __name__ == "__main__":
    sys.exit(_main())
