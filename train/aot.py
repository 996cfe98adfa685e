"""The training step as a program compiled ahead of time: the one code path from flags to
`jit(...).lower(abstract inputs).compile()`, used by the trainer's pre-flight memory check
(train.loop) and by `tools.tpu_compile`, which compiles it for a TPU topology on a machine
without one (devices from libtpu's topology description instead of jax.devices()).

    prog = step_program(cfg, dcfg, mesh, seq_len=3072, feature_dim=5 * 2880, num_anchors=512)
    compiled = prog.compile()          # no array is allocated: every input is abstract
    memory.step_device_bytes(compiled, prog.batch_device_bytes())

Also the TPU chips this project targets (HBM, bf16 peak) and their topology devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

from pipeline.errors import UserError
from train import step as step_lib
from train.config import TrainConfig
from train.mesh import make_mesh

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per chip, as the vendor states it
    peak_bf16_flops: float  # per chip, dense bf16 matmul peak


# Keyed by jax Device.device_kind, as libtpu reports it. Google Cloud TPU documentation.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12),
    "TPU v5p": Chip("v5p", 95 * GiB, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12),
    "TPU v6e": Chip("v6e", 32 * GiB, 918e12),
}


def chip_for(device) -> Chip | None:
    return CHIPS.get(getattr(device, "device_kind", ""))


def device_hbm_bytes(device, devices=()) -> int | None:
    """HBM one device may use: its chip's, split over the devices libtpu places on that chip
    (same coords: v4 topologies list each TensorCore as a device). None: not a known TPU."""
    chip = chip_for(device)
    if chip is None:
        return None
    coords = getattr(device, "coords", None)
    same = sum(1 for d in devices if coords is not None and getattr(d, "coords", None) == coords)
    return chip.hbm_bytes // max(1, same)


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. "v5e:2x4"), from libtpu, with no TPU attached.
    One UserError line when libtpu is missing or does not know the name."""
    try:
        import libtpu  # noqa: F401  (only its presence matters: the TPU PJRT plugin)
    except ImportError:
        raise UserError("libtpu is not installed in this environment: run `make tpu-venv` and use "
                        ".venv-tpu/bin/python (the main .venv has no libtpu on purpose)") from None
    import os
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock at start-up (/tmp/libtpu_lockfile), meant for the chips
    # of a TPU VM; with no chip attached it only serialises compiles, so let them run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu raises XlaRuntimeError/ValueError with a long text
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), repr(e))
        raise UserError(f"--topology {name!r}: libtpu cannot build it ({first}); use e.g. "
                        "v5e:2x2, v5e:2x4, v5p:2x2x1, v6e:2x4, v4:2x2x1") from None


@contextlib.contextmanager
def target_backend(platform: str):
    """Make jax.default_backend() name the platform the program is compiled for while it is
    traced: train.step resolves --attention (auto -> pallas_tpu on TPU) by the default backend,
    which on a machine compiling for a TPU topology is the CPU. A no-op when they agree."""
    original = jax.default_backend
    if original() == platform:
        yield
        return
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = original


class DoesNotFit(Exception):
    """XLA:TPU refuses to compile a program that exceeds HBM (RESOURCE_EXHAUSTED, "Ran out of
    memory in memory space hbm"); there is then no memory analysis, only its message."""

    def __init__(self, message: str, used: int | None, available: int | None,
                 parts: dict | None = None):
        super().__init__(message)
        self.used, self.available = used, available
        self.parts = parts or {}  # the compiler's own split, e.g. {"arguments": ..., "program": ...}


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _oom(message: str) -> DoesNotFit | None:
    if "Ran out of memory" not in message and "RESOURCE_EXHAUSTED" not in message:
        return None
    m = re.search(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", message)
    used = avail = None
    if m:
        used = int(float(m.group(1)) * _UNITS[m.group(2)])
        avail = int(float(m.group(3)) * _UNITS[m.group(4)])
    else:  # the other form: one allocation alone is larger than HBM (used: at least that much)
        m = re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", message)
        if m:
            used, avail = int(m.group(1)), int(m.group(2))
    # "Total hbm usage >= ...:  reserved 258.00M / program 3.58G / arguments 33.67G": which part
    # overflows tells the user what to change (weights per chip vs activations)
    parts = {k: int(float(v) * _UNITS[u]) for k, v, u in
             re.findall(r"^\s*(reserved|program|arguments)\s+([\d.]+)([KMGT]?)\s*$", message, re.M)}
    first = next((ln.strip() for ln in message.splitlines() if "memory" in ln.lower()),
                 message.splitlines()[0] if message else "")
    return DoesNotFit(first[:300], used, avail, parts)


def compile_lowered(lowered):
    """lowered.compile(); DoesNotFit when the TPU compiler finds the program exceeds HBM."""
    try:
        return lowered.compile()
    except Exception as e:  # XlaRuntimeError; anything but an OOM propagates
        oom = _oom(str(e))
        if oom is None:
            raise
        raise oom from None


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The jitted step with its shardings and abstract (sharded) inputs."""
    step_fn: object
    init: object  # rng -> fresh unsharded state
    state: dict  # abstract, sharded
    frozen: dict
    batch: dict
    state_sh: dict
    frozen_sh: dict
    batch_sh: dict
    shards: int  # data x fsdp: the batch split
    platform: str  # of the mesh's devices: what the program is compiled for

    def compile(self):
        """The compiled step; DoesNotFit when the TPU compiler finds it exceeds HBM."""
        with target_backend(self.platform):
            return compile_lowered(self.step_fn.lower(self.state, self.frozen, self.batch))

    def batch_device_bytes(self) -> int:
        """One batch's bytes per device (the loop places the next one while a step runs)."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in self.batch.values()) // self.shards


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def step_program(cfg: TrainConfig, dcfg, mesh, *, seq_len: int, feature_dim: int,
                 num_anchors: int, feature_sums: bool = False) -> StepProgram:
    """train.step's jitted step over `mesh`, with the state, frozen tensors and the batch the
    loader yields (train/loader.py `_Draw`) as sharded ShapeDtypeStructs; `feature_sums`: the
    batch carries each sequence's feature sums and the step checks them (a cache's default)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by data x fsdp = {shards}")
    cdt = jnp.dtype(cfg.compute_dtype)
    frozen_abs = {k: jax.ShapeDtypeStruct((dcfg.vocab_size, dcfg.hidden_size), cdt)
                  for k in ("embed", "lm_head")}
    frozen_sh = step_lib.frozen_shardings(mesh, frozen_abs)
    init = functools.partial(step_lib.init_state, cfg, dcfg)
    state_abs = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
    state_sh = step_lib.state_shardings(cfg, dcfg, mesh, state_abs)
    batch_sh = step_lib.batch_shardings(mesh, feature_sums)
    b = cfg.batch_size
    shapes = {"input_ids": ((b, seq_len), jnp.int32), "loss_mask": ((b, seq_len), jnp.uint8),
              "features": ((b, seq_len, feature_dim), jnp.bfloat16),
              "anchors": ((b, num_anchors), jnp.int32), "anchor_valid": ((b, num_anchors), jnp.bool_)}
    if feature_sums:
        shapes["feature_sums"] = ((b, 2), jnp.uint32)
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=batch_sh[k]) for k, (s, dt) in shapes.items()}
    platform = mesh.devices.flat[0].platform
    with target_backend(platform):
        step_fn = step_lib.jit_step(cfg, dcfg, mesh, state_sh, frozen_sh, feature_sums)
    return StepProgram(step_fn=step_fn, init=init, platform=platform,
                       state=_abstract(state_abs, state_sh), frozen=_abstract(frozen_abs, frozen_sh),
                       batch=batch, state_sh=state_sh, frozen_sh=frozen_sh, batch_sh=batch_sh,
                       shards=shards)


def compile_or_refuse(prog: StepProgram, cfg: TrainConfig):
    """prog.compile(), or the trainer's one-line refusal when the compiler finds it cannot fit."""
    try:
        return prog.compile()
    except DoesNotFit as e:
        need = (f"needs {e.used / 1e9:.2f} GB per device, {e.available / 1e9:.2f} GB of HBM"
                if e.used is not None else f"exceeds device memory ({e})")
        remat = "" if cfg.remat else " or --remat"
        raise UserError(f"the training step will not fit in memory: it {need}; shrink it with "
                        f"--batch-size (now {cfg.batch_size}), --anchors-per-seq (now "
                        f"{cfg.anchors_per_seq}){remat}") from None


def topology_mesh(spec: str | None, devices: list):
    """The trainer's mesh (train.mesh.make_mesh: same axes, same default) over topology devices."""
    return make_mesh(spec, devices)
