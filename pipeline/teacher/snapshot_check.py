"""Check a GPT-OSS snapshot before anything is allocated for it: config.json against the
safetensors headers (every tensor the architecture needs, by name, shape and dtype), then the
memory loading it will take against what the host (and the devices) have.

A config.json that does not describe its weights (`hidden_size: 1000000` beside a 128-wide
checkpoint) would otherwise make EasyDeL initialise parameters of the configured size, until the
kernel kills the process; a snapshot too large for the machine would do the same. Both are one
`error:` line here, from the headers alone (a few KB read per file, no tensor bytes).

    check_snapshot(path, hf_config, dtype)   # the loaders call this one line first
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from model.safetensors_io import INDEX_NAME, weight_map
from pipeline.errors import UserError
from pipeline.hostmem import host_available_bytes

_FLOAT = {"F32", "BF16", "F16"}
_MXFP4 = {"U8"}  # gpt-oss ships its experts as MXFP4 *_blocks / *_scales (uint8)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# loading through torch (EasyDeL from_torch=True) holds the stored tensors and the converted
# parameters at once; the factor covers the conversion's transient copy of the largest tensors
_LOAD_SLACK = 1.10


def read_headers(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor of the snapshot's *.safetensors files, from their
    JSON headers only."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():  # its file names are checked to stay inside the snapshot
        files = sorted({path / f for f in weight_map(path).values()})
    else:  # not weight_map's safe_open: only the headers are read here, not the tensor bytes
        files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 << 20:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    out[name] = (tuple(int(d) for d in meta["shape"]), str(meta["dtype"]))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _int(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key)
    v = default if v is None else v  # HF writes absent optional sizes as null
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"config.json: {key} is {v!r}, expected a positive integer")
    return v


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...] | dict]:
    """What a GPT-OSS config says its snapshot holds: name -> shape; expert weights, which may be
    dense or MXFP4, -> {"dense": shape, "blocks": shape, "scales": shape}."""
    h, v, layers = _int(cfg, "hidden_size"), _int(cfg, "vocab_size"), _int(cfg, "num_hidden_layers")
    heads, kv = _int(cfg, "num_attention_heads"), _int(cfg, "num_key_value_heads")
    hd = _int(cfg, "head_dim", h // heads if h >= heads else None)
    experts, inter = _int(cfg, "num_local_experts"), _int(cfg, "intermediate_size")
    want: dict = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        want["lm_head.weight"] = (v, h)
    for i in range(layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        want.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                     a + "q_proj.weight": (heads * hd, h), a + "k_proj.weight": (kv * hd, h),
                     a + "v_proj.weight": (kv * hd, h), a + "o_proj.weight": (h, heads * hd),
                     a + "sinks": (heads,), m + "router.weight": (experts, h),
                     m + "router.bias": (experts,),
                     m + "experts.gate_up_proj_bias": (experts, 2 * inter),
                     m + "experts.down_proj_bias": (experts, h)})
        if cfg.get("attention_bias", True):
            want.update({a + "q_proj.bias": (heads * hd,), a + "k_proj.bias": (kv * hd,),
                         a + "v_proj.bias": (kv * hd,), a + "o_proj.bias": (h,)})
        want[m + "experts.gate_up_proj"] = _expert(experts, h, 2 * inter)
        want[m + "experts.down_proj"] = _expert(experts, inter, h)
    return want


def _expert(e: int, d_in: int, d_out: int) -> dict:
    """Dense [E, in, out] (HF layout) or MXFP4 blocks [E, out, in/32, 16] + scales [E, out, in/32]."""
    nb = math.ceil(d_in / 32)
    return {"dense": (e, d_in, d_out), "blocks": (e, d_out, nb, 16), "scales": (e, d_out, nb)}


def check_headers(path, cfg: dict, headers: dict) -> int:
    """Refuse a snapshot whose headers do not hold what its config describes (one line naming
    the first mismatches); returns the parameter count (MXFP4 counted unpacked)."""
    problems, params = [], 0
    for name, shape in expected_tensors(cfg).items():
        if isinstance(shape, dict):
            if name in headers:
                got, dt = headers[name]
                ok = got == shape["dense"] and dt in _FLOAT
                want_s = f"{list(shape['dense'])} float"
            elif name + "_blocks" in headers and name + "_scales" in headers:
                (gb, db), (gs, ds) = headers[name + "_blocks"], headers[name + "_scales"]
                ok = (gb, gs) == (shape["blocks"], shape["scales"]) and {db, ds} <= _MXFP4
                got, dt = (gb, gs), f"{db}/{ds}"
                want_s = f"MXFP4 blocks {list(shape['blocks'])} scales {list(shape['scales'])} U8"
            else:
                problems.append(f"{name} missing")
                continue
            params += math.prod(shape["dense"])
        else:
            if name not in headers:
                problems.append(f"{name} missing")
                continue
            got, dt = headers[name]
            ok, want_s = got == shape and dt in _FLOAT, f"{list(shape)} float"
            params += math.prod(shape)
        if not ok:
            problems.append(f"{name} is {list(got) if not isinstance(got[0], tuple) else got} "
                            f"{dt}, config.json implies {want_s}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path}: config.json does not describe the safetensors weights: "
                        f"{'; '.join(problems[:3])}{more}; the snapshot is inconsistent (edited "
                        "config or mixed files), nothing was loaded")
    return params


def estimate_load_bytes(headers: dict, params: int, dtype) -> tuple[int, int]:
    """(host bytes, device bytes in all) of loading: the stored tensors (read through torch) and
    the parameters in `dtype`."""
    stored = sum(math.prod(s) * _DTYPE_BYTES.get(d, 4) for s, d in headers.values())
    return int(stored * _LOAD_SLACK), params * _itemsize(dtype)


def _itemsize(dtype) -> int:
    import ml_dtypes  # "bfloat16" is no numpy name

    return np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype).itemsize


def check_snapshot(path, hf_config: dict, dtype, devices=None) -> dict:
    """Headers against config, then memory against the machine; one UserError line otherwise.
    Returns the estimate {params, host_bytes, device_bytes, host_available, device_free}."""
    headers = read_headers(path)
    params = check_headers(path, hf_config, headers)
    host, device = estimate_load_bytes(headers, params, dtype)
    on_host = not devices or devices[0].platform == "cpu"
    need_host = host + (device if on_host else 0)  # CPU "devices" are host RAM
    avail = host_available_bytes()
    est = {"params": params, "host_bytes": need_host, "device_bytes": device,
           "host_available": avail, "device_free": None}
    if need_host > avail:
        raise UserError(f"{path}: loading this teacher ({params / 1e9:.2f}B parameters) needs "
                        f"~{need_host / 1e9:.1f} GB of host memory, {avail / 1e9:.1f} GB available; "
                        "use a machine with more memory (or a smaller --model)")
    if not on_host:
        free = _device_free(devices)
        est["device_free"] = free
        if free is not None and device / len(devices) > free:
            raise UserError(f"{path}: the teacher's {params / 1e9:.2f}B parameters need "
                            f"~{device / len(devices) / 1e9:.1f} GB per device, {free / 1e9:.1f} GB "
                            "free; it cannot fit on these devices")
    return est


def _device_free(devices) -> int | None:
    free = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # backends without stats (a TPU topology compiled for ahead of time)
            return None
        if "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None
