"""JAX process set-up for teacher commands: persistent compilation cache, backend start, mesh shape.

Call `enable_compilation_cache()` AFTER importing easydel: importing it runs ejkernel's `ejit`
decorators, which point `jax_compilation_cache_dir` at ~/.cache/ejkernel (a side effect of
ejkernel/callib/_ejit.py), overriding any earlier setting.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.teacher.sharding import AXIS_NAMES  # re-exported: EasyDeL's mesh axis order

DEFAULT_CACHE_DIR = "/dev/shm/dflash/jax_cache"
CACHE_ENV = "DFLASH_JAX_CACHE"  # a directory, or "off" to disable


def compilation_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cache directory to use: argument, else $DFLASH_JAX_CACHE, else the default; None = off."""
    value = str(cache_dir) if cache_dir is not None else os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    return None if value.strip().lower() in ("", "off", "none", "0") else Path(value)


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None,
                             min_compile_secs: float = 1.0) -> Path | None:
    """Turn on JAX's persistent compilation cache (see compilation_cache_dir); returns the dir."""
    import jax

    path = compilation_cache_dir(cache_dir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the JAX compilation cache {path}: {e.strerror}; "
                        f"set {CACHE_ENV}=off or another directory") from None
    changed = jax.config.jax_compilation_cache_dir != str(path)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    if changed:  # JAX opens its cache once per process; make it reopen at the new place
        try:
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass
    return path


def start_backend():
    """Initialise JAX's backend and return its devices; a failure becomes one UserError line.

    The usual cause on a TPU VM is another process holding the chips (JAX then fails to open
    /dev/accel*), so the message says how to find it.
    """
    import jax

    try:
        return jax.devices()
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), repr(e))
        raise UserError(
            f"the accelerator backend could not start ({first}); if another process holds the "
            "TPU, stop it (find it with `lsof -w /dev/accel* /dev/vfio/*`), or run on CPU with "
            "JAX_PLATFORMS=cpu") from None


def parse_axis_dims(text: str) -> tuple[int, ...]:
    """'1,1,1,8,1' -> (1, 1, 1, 8, 1): the --sharding-axis-dims flag, EasyDeL order dp,fsdp,ep,tp,sp."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != len(AXIS_NAMES) or any(d == 0 or d < -1 for d in dims) or dims.count(-1) > 1:
        raise UserError(f"--sharding-axis-dims {text!r}: expected 5 comma-separated sizes for "
                        f"{','.join(AXIS_NAMES)} (positive, at most one -1), e.g. 1,1,1,8,1")
    return dims


def check_axis_dims(dims, num_devices: int, platform: str = "tpu",
                    dense_experts: bool = False) -> tuple[int, ...]:
    """Validate dims against the device count (EasyDeL's mesh always spans every device).

    On CPU, fsdp and ep must be 1 unless the MoE runs EasyDeL's dense path (dense_experts,
    pipeline.teacher.sharding.use_dense_experts): EasyDeL binds fsdp to its expert axis, and
    its fused expert-parallel MoE needs ragged-all-to-all, which XLA:CPU does not implement.
    """
    text = ",".join(map(str, dims))
    known = math.prod(d for d in dims if d != -1)
    ok = (num_devices % known == 0) if -1 in dims else (known == num_devices)
    if not ok:
        raise UserError(f"--sharding-axis-dims {text} does not fit the {num_devices} device(s) "
                        "present (the product must equal it)")
    resolved = [num_devices // known if d == -1 else d for d in dims]
    if platform == "cpu" and not dense_experts and (resolved[1] > 1 or resolved[2] > 1):
        raise UserError(f"--sharding-axis-dims {text}: fsdp/ep > 1 means expert parallelism, which "
                        "XLA:CPU cannot run; use dp and tp on CPU, e.g. 1,1,1,"
                        f"{num_devices},1")
    return tuple(int(d) for d in dims)


@contextlib.contextmanager
def process_local_devices():
    """Under jax.distributed, make jax.devices()/device_count()/process_count() report only this
    process's devices while the block runs (loading the teacher): EasyDeL then builds its mesh
    and places the weights on them, so each process runs the teacher forward on its own rows
    with no cross-process communication (and hosts may resume at different points).
    A no-op in a single process."""
    import jax

    if jax.process_count() == 1:
        yield
        return
    saved = jax.devices, jax.device_count, jax.process_count
    jax.devices = lambda backend=None: jax.local_devices(backend=backend)
    jax.device_count = lambda backend=None: jax.local_device_count(backend)
    jax.process_count = lambda backend=None: 1
    try:
        yield
    finally:
        jax.devices, jax.device_count, jax.process_count = saved
