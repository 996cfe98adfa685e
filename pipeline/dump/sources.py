"""What the dump reads: the teacher's identity and shape, the teacher itself, and the sequences.

`teacher_info` needs only the snapshot's config.json (no weights), so a rerun against a finished
cache, or one with mismatched settings, is answered before the expensive teacher load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.teacher.hashing import sha256_file

GPT_OSS_MASK_TOKEN_ID = 200000  # a reserved id of the o200k_harmony vocabulary (DFLASH.md)


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
    num_layers: int
    hidden_size: int
    identity: dict  # goes into the manifest; part of the cache's settings
    data_identity: dict
    model_path: Path | None = None
    tokenizer: str | None = None
    mask_token_id: int | None = None
    vocab_size: int | None = None
    max_positions: int | None = None  # the teacher's max_position_embeddings


def _weights_sha256(path: Path) -> str:
    """Hash of the weights index, or of each safetensors header (names, shapes, offsets) + size:
    identifies the weights without reading tens of GB."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sha256_file(index)
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(n))
    return h.hexdigest()


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(vars(cfg))


def _content_digest(path: Path, h) -> None:
    """Stream a file's bytes into `h` (xxh3_128: ~15 GB/s, so big data adds little to a dump)."""
    try:
        with open(path, "rb", buffering=0) as fh:
            while block := fh.read(8 << 20):
                h.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def data_identity(data: str | None) -> dict:
    """The data source and a fingerprint of the content of exactly the files the reader reads
    (pipeline.data.sequences.resolve_source: not __pycache__, not files of other types), so an edit of
    the data between a kill and the resume is refused even when no size changes."""
    import xxhash

    from pipeline.data.sequences import resolve_source
    if data is None or data.startswith("builtin"):
        return {"source": data or "builtin"}
    files = []
    for kind, loc in resolve_source(data):
        loc = Path(loc)
        if kind == "datasets":  # a saved dataset: its arrow files and metadata
            files += sorted(q for q in loc.rglob("*")
                            if q.is_file() and "__pycache__" not in q.parts)
        else:
            files.append(loc)
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f"{f.resolve()}\0{f.stat().st_size}\0".encode())
        _content_digest(f, h)
    return {"source": os.path.abspath(data) if Path(data).exists() else data,
            "files": len(files), "fingerprint": h.hexdigest()[:32]}


def _mask_token_id(cfg: dict, model_path: Path | None):
    if cfg.get("mask_token_id") is not None:
        return int(cfg["mask_token_id"])
    if model_path is not None and (model_path / "tokenizer_config.json").exists():
        tok_cfg = json.loads((model_path / "tokenizer_config.json").read_text())
        if tok_cfg.get("mask_token_id") is not None:
            return int(tok_cfg["mask_token_id"])
    return GPT_OSS_MASK_TOKEN_ID if cfg.get("model_type") == "gpt_oss" else None


def check_seq_len(config, cfg: dict) -> None:
    """--seq-len must fit the teacher's positions (checked before anything is written)."""
    from pipeline.data.limits import check_window, teacher_positions

    check_window(config.seq_len, teacher_positions(cfg))


def _snapshot_info(config, path: Path) -> TeacherInfo:
    """Everything the dump needs from the snapshot, validated before any file is written:
    config.json (JSON, GPT-OSS, its sizes), safetensors weights present, --seq-len in range."""
    from pipeline.teacher.snapshot import check_weights, read_config
    from pipeline.teacher.snapshot_check import check_headers, read_headers
    cfg_path = path / "config.json"
    cfg = read_config(path)
    check_weights(path)
    check_seq_len(config, cfg)
    check_headers(path, cfg, read_headers(path))  # config.json describes the weights
    identity = {"path": str(path), "config_sha256": sha256_file(cfg_path),
                "weights_sha256": _weights_sha256(path), "model_type": cfg.get("model_type")}
    tokenizer = str(path) if any((path / f).is_file() for f in (
        "tokenizer.json", "tokenizer_config.json")) else None
    return TeacherInfo(
        int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), identity,
        data_identity(config.data), path, tokenizer, _mask_token_id(cfg, path),
        cfg.get("vocab_size"), cfg.get("max_position_embeddings"))


def teacher_info(config, teacher=None) -> TeacherInfo:
    """Shape and identity of the teacher named by config.model, or of an injected one (a loaded
    `Teacher` is identified by its snapshot; a stand-in by its `identity` attribute)."""
    if teacher is None:
        from pipeline.teacher.snapshot import resolve_model
        return _snapshot_info(config, Path(resolve_model(config.model)).resolve())
    path = getattr(teacher, "path", None)
    if path is not None and (Path(path) / "config.json").is_file():
        return _snapshot_info(config, Path(path).resolve())
    cfg = _as_dict(getattr(teacher, "config", None))
    check_seq_len(config, cfg)
    identity = dict(getattr(teacher, "identity", None) or {"path": config.model})
    return TeacherInfo(
        int(teacher.num_layers), int(teacher.hidden_size), identity, data_identity(config.data),
        None, getattr(teacher, "tokenizer_path", None), _mask_token_id(cfg, None),
        cfg.get("vocab_size"), cfg.get("max_position_embeddings"))


def teacher_attention(config, teacher=None) -> str:
    """The attention the dump's teacher runs, recorded in the manifest (part of the cache's
    settings): an injected teacher's own, else --attention, "auto" resolved for the backend of
    this machine (pipeline.teacher.attention.resolve_attention; starts the backend)."""
    if teacher is not None:
        return str(getattr(teacher, "attention", config.attention))
    if config.attention != "auto":
        return config.attention
    from pipeline.teacher.attention import resolve_attention
    from pipeline.teacher.jax_setup import process_local_devices, start_backend
    with process_local_devices():
        return resolve_attention("auto", start_backend()[0].platform)


def check_attention_length(config, attention: str, info: TeacherInfo) -> None:
    """--seq-len as `attention` runs it (blocksparse pads it to its block) must fit the
    teacher's positions: one UserError line before any file is written."""
    from pipeline.teacher.attention import run_length
    limit = info.max_positions
    run_length(config.seq_len, attention,
               max_positions=limit if isinstance(limit, int) and not isinstance(limit, bool) else None)


def load_teacher(config, info: TeacherInfo):
    """The EasyDeL teacher (imported here: the cache modules must not pull in easydel)."""
    import jax.numpy as jnp

    from pipeline.teacher.jax_setup import process_local_devices
    from pipeline.teacher.easydel_teacher import Teacher
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[config.dtype]
    with process_local_devices():  # multi-process dump: each process's teacher is its own
        return Teacher.from_pretrained(str(info.model_path), dtype=dtype,
                                       sharding_axis_dims=config.sharding_axis_dims,
                                       attention=config.attention)


def default_sequences(config, info: TeacherInfo):
    """The packed (input_ids, loss_mask) sequences of --data, tokenized by the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.data.sequences import iter_sequences
    if info.tokenizer is None:
        raise UserError("the teacher has no tokenizer to encode --data with")
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.tokenizer)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {info.tokenizer}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return iter_sequences(config.data, tokenizer, config.seq_len)
