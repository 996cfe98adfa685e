"""Shared helpers of the train tests: a small feature cache in the real on-disk format.

The records are written with pipeline.cache.format's encoder and part layout, so the loader reads
exactly what `pipeline.teacher_dump` produces.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from pipeline.cache.format import (
    MANIFEST_NAME, WRITER_OPTIONS, CacheManifest, PartInfo, encode_record, part_filename)
from pipeline.cache.format import file_crc32


def write_cache(out: Path, records, *, hidden_size: int, layer_ids, teacher: dict,
                shards: int = 2, commit_every: int = 4, mask_token_id: int = 0,
                vocab_size: int | None = None) -> CacheManifest:
    """records: list of (input_ids [T], loss_mask [T], features [T, K*H]) -> a complete cache."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq_len = records[0][0].shape[0]
    manifest = CacheManifest(seq_len=seq_len, hidden_size=hidden_size, layer_ids=tuple(layer_ids),
                             shards=shards, commit_every=commit_every, teacher=teacher,
                             mask_token_id=mask_token_id, vocab_size=vocab_size)
    layout = manifest.layout
    groups: dict[tuple[int, int], list[bytes]] = {}
    for i, rec in enumerate(records):
        shard, part, _ = layout.locate(i)
        groups.setdefault((shard, part), []).append(encode_record(*rec))
    parts = []
    for (shard, part), bufs in sorted(groups.items()):
        name = part_filename(shard, part, shards)
        w = ArrayRecordWriter(str(out / name), WRITER_OPTIONS)
        for b in bufs:
            w.write(b)
        w.close()
        parts.append(PartInfo(shard, part, name, len(bufs), (out / name).stat().st_size,
                              file_crc32(out / name)))
    manifest = manifest.with_parts(parts, complete=True)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    return manifest


def random_records(n: int, seq_len: int, feat_dim: int, vocab: int, seed: int = 0):
    """Random sequences whose loss_mask has a prompt prefix and some padding (edge cases)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(0, vocab, seq_len).astype(np.int32)
        mask = np.zeros(seq_len, np.uint8)
        start, end = rng.integers(0, seq_len // 3), seq_len - rng.integers(0, seq_len // 4)
        mask[start:end] = 1
        feats = rng.standard_normal((seq_len, feat_dim)).astype(np.float32)
        out.append((ids, mask, feats))
    return out


def write_teacher_stub(out: Path, *, hidden: int = 32, layers: int = 4, heads: int = 4,
                       kv_heads: int = 2, vocab: int = 128, seed: int = 0,
                       extra_tensor: bool = True, complete: bool = False) -> Path:
    """A GPT-OSS-shaped snapshot holding only what the trainer reads (config.json, embedding,
    LM head, sharded over two files with an index) plus one decoy tensor it must not need.
    complete: every other tensor the config implies too (zeros), for commands that check the
    snapshot's headers against its config (a dump with a stand-in teacher claiming this path)."""
    from safetensors.numpy import save_file
    import ml_dtypes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
           "intermediate_size": hidden, "num_local_experts": 4, "rms_norm_eps": 1e-5,
           "rope_theta": 150000.0, "max_position_embeddings": 4096,
           "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "original_max_position_embeddings": 4096},
           "attention_bias": True, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    embed = (rng.standard_normal((vocab, hidden)) * 0.5).astype(bf16)
    head = (rng.standard_normal((vocab, hidden)) * 0.5).astype(bf16)
    save_file({"model.embed_tokens.weight": embed}, str(out / "model-00001-of-00002.safetensors"))
    rest = {"lm_head.weight": head}
    if extra_tensor:
        rest["model.layers.0.mlp.router.weight"] = np.zeros((4, hidden), np.float32)
    if complete:
        from pipeline.teacher.snapshot_check import expected_tensors

        for name, shape in expected_tensors(cfg).items():
            shape = shape["dense"] if isinstance(shape, dict) else shape
            if name not in rest and name != "model.embed_tokens.weight":
                rest[name] = np.zeros(shape, bf16)
    save_file(rest, str(out / "model-00002-of-00002.safetensors"))
    wmap = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    wmap.update({k: "model-00002-of-00002.safetensors" for k in rest})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return out


def small_run_data(tmp: Path, *, n_seqs: int = 24, seq_len: int = 32, layer_ids=(1, 2),
                   hidden: int = 32, vocab: int = 128, seed: int = 0) -> Path:
    """A teacher stub and a cache of random sequences in the real format -> the cache dir."""
    teacher = write_teacher_stub(tmp / "teacher", hidden=hidden, vocab=vocab, seed=seed)
    data = tmp / "cache"
    recs = random_records(n_seqs, seq_len, len(layer_ids) * hidden, vocab, seed=seed)
    write_cache(data, recs, hidden_size=hidden, layer_ids=layer_ids,
                teacher={"path": str(teacher)}, mask_token_id=vocab - 1, vocab_size=vocab)
    return data
