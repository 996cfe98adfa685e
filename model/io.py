"""Draft checkpoints: the z-lab format (config.json + safetensors, reference names) and msgpack.

z-lab names (what SGLang, vLLM and `dflash` load) hold torch Linear weights [out, in]; our params
hold Flax kernels [in, out], so every kernel is transposed on the way in and out.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.config import DraftConfig
from model.draft import param_shapes
from model.speculators_format import (VERIFIER_OWNED, from_speculators_dict,
                                      is_speculators_config, to_speculators_dict)
from model.errors import CheckpointError, UserError
from model.safetensors_io import read_safetensors

MSGPACK_FORMAT = "dflash-tpu-draft/1"
_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _hf_names(config: DraftConfig) -> dict[tuple, str]:
    """Param path (tuple of keys / list indices) -> reference tensor name."""
    names = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(param_shapes(config),
                                                        is_leaf=lambda x: isinstance(x, tuple))[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        # A bare parameter (DFlash2's base_kernel and codebooks: torch nn.Parameter, not a
        # module's weight) keeps its own name, as the published checkpoints store it.
        tail = (_SUFFIX[keys[-1]],) if keys[-1] in _SUFFIX else (keys[-1],)
        names[keys] = ".".join(str(k) for k in keys[:-1] + tail)
    return names


def _set(tree, keys, value):
    for k in keys[:-1]:
        tree = tree[k]
    tree[keys[-1]] = value


def to_hf_state_dict(config: DraftConfig, params: dict) -> dict[str, np.ndarray]:
    """Reference-named numpy tensors (kernels transposed to [out, in])."""
    out = {}
    for keys, name in _hf_names(config).items():
        x = params
        for k in keys:
            x = x[k]
        x = np.asarray(jax.device_get(x))
        out[name] = np.ascontiguousarray(x.T if keys[-1] == "kernel" else x)
    return out


def from_hf_state_dict(config: DraftConfig, tensors: dict, dtype=None) -> dict:
    """Params from reference-named tensors; every expected name must be there, with its shape."""
    names = _hf_names(config)
    missing = sorted(set(names.values()) - set(tensors))
    extra = sorted(set(tensors) - set(names.values()) - {"rotary_emb.inv_freq"})
    if missing or extra:
        raise UserError(f"draft weights do not match the config: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}")
    params = jax.tree.map(lambda _: None, param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    for keys, name in names.items():
        x = np.asarray(tensors[name])
        x = x.T if keys[-1] == "kernel" else x
        want = _lookup(param_shapes(config), keys)
        if tuple(x.shape) != tuple(want):
            # fc maps the K concatenated target features to the draft width: a config edited to
            # another width or K shows up here first, so say which config fields set it
            why = (f" (hidden_size {config.hidden_size}, {config.num_features} target layers)"
                   if name == "fc.weight" else "")
            raise UserError(f"{name}: shape {tuple(x.shape)} but the config needs "
                            f"{tuple(want)}{why}")
        _set(params, keys, jnp.asarray(x, dtype=dtype or x.dtype))
    return params


def _lookup(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _dtype_name(params) -> str:
    return str(jax.tree.leaves(params)[0].dtype)


FORMATS = ("z-lab", "speculators")


def save_draft(path, config: DraftConfig, params: dict, dtype=None, fmt: str = "z-lab",
               verifier: str | None = None) -> Path:
    """Write <path>/config.json and <path>/model.safetensors in the z-lab format or the
    speculators one (same tensors, other config; `verifier` names the target there). The config
    is built first, so a config the format cannot express (FormatError) writes nothing."""
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown draft format {fmt!r} (expected one of {FORMATS})")
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    if fmt == "speculators":
        cfg = to_speculators_dict(config, dtype=_dtype_name(params), verifier=verifier)
    else:
        cfg = config.to_hf_dict(dtype=_dtype_name(params))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(to_hf_state_dict(config, params), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_config(path) -> DraftConfig:
    """DraftConfig of a z-lab checkpoint directory (or of its config.json)."""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.is_file():
        raise UserError(f"{path}: no config.json (expected a z-lab DFlash draft directory)")
    try:
        d = json.loads(cfg.read_text())
        if is_speculators_config(d):
            return from_speculators_dict(d, _verifier_depth(d))
        return DraftConfig.from_hf_dict(d)
    except (KeyError, ValueError, TypeError) as e:  # FormatError is a ValueError
        raise UserError(f"{cfg}: not a usable DFlash draft config ({e})") from e


def _verifier_depth(d: dict) -> int | None:
    """num_hidden_layers of a speculators config's verifier when it is a local directory."""
    name = ((d.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    cfg = Path(name) / "config.json" if name else None
    if cfg is None or not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("num_hidden_layers")


def draft_format(path) -> str:
    """"speculators" or "z-lab": the format of a draft directory's config.json."""
    cfg = Path(path) / "config.json"
    try:
        return "speculators" if is_speculators_config(json.loads(cfg.read_text())) else "z-lab"
    except (OSError, ValueError):
        return "z-lab"


def load_draft(path, dtype=None) -> tuple[DraftConfig, dict]:
    """(config, params) from a z-lab or speculators directory; dtype None keeps the stored
    dtype. Verifier-owned tensors a speculators checkpoint may hold (embedding, heads) are not
    draft params and are dropped."""
    path = Path(path)
    config = load_config(path)
    tensors = read_safetensors(path)
    if draft_format(path) == "speculators":
        tensors = {k: v for k, v in tensors.items() if k not in VERIFIER_OWNED}
    try:
        return config, from_hf_state_dict(config, tensors, dtype=dtype)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# ------------------------------------------------------------------ msgpack


def save_msgpack(path, config: DraftConfig, params: dict) -> Path:
    """One msgpack file: the config (z-lab dict) and the params (layers keyed '0', '1', ...)."""
    from flax import serialization

    state = {"format": MSGPACK_FORMAT, "config": json.dumps(config.to_hf_dict()),
             "params": serialization.to_state_dict(jax.device_get(params))}
    path = Path(path)
    path.write_bytes(serialization.msgpack_serialize(state))
    return path


def load_msgpack(path, config: DraftConfig | None = None) -> tuple[DraftConfig, dict]:
    """(config, params) from save_msgpack's file, or from a bare params msgpack (the seed's
    `draft_params.msgpack`, optionally wrapped as {"params": ...}) when `config` is given."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such msgpack file")
    from msgpack.exceptions import UnpackException

    try:  # a truncated file fails mid-parse, or in flax's ndarray hook on a cut-off payload
        state = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError, UnpackException) as e:
        raise CheckpointError(f"{path}: not a readable msgpack file (truncated or corrupt: "
                              f"{_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: msgpack holds a {type(state).__name__}, not a params dict")
    if state.get("format") == MSGPACK_FORMAT:
        try:
            stored = DraftConfig.from_hf_dict(json.loads(state["config"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: stored draft config unreadable ({_first_line(e)})") from None
        if config is not None and config != stored:
            raise UserError(f"{path}: stored config differs from the one given")
        config, tree = stored, state["params"]
    else:
        if config is None:
            raise UserError(f"{path}: a bare params msgpack needs a config (--config)")
        tree = state.get("params", state) if set(state) == {"params"} else state
    target = jax.tree.map(lambda s: np.zeros(s, np.float32), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    try:
        params = serialization.from_state_dict(target, tree)
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: params do not match the config ({e})") from e
    bad = [f"{jax.tree_util.keystr(k)} {np.shape(v)} vs {np.shape(w)}"
           for (k, v), w in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(target)) if np.shape(v) != np.shape(w)]
    if bad:
        raise UserError(f"{path}: param shapes do not match the config: {bad[:3]}")
    return config, jax.tree.map(jnp.asarray, params)
