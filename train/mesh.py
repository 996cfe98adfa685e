"""Device mesh (axes data, fsdp, tensor) and the one table mapping logical axis names to it.

Params carry logical names (`model.param_logical_axes`): embed, heads, kv, mlp, vocab. The batch
axis is split over data x fsdp (fsdp shards params *and* batch, as in ZeRO-3); tensor splits the
head / mlp / vocab dimensions.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pipeline.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it may be split over (first that divides the dimension wins).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "rank": ("fsdp",),  # DFlash2 selector codebooks [V, rank]: split, not copied per device
}


def parse_mesh(spec: str | None, n_devices: int, n_processes: int = 1) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> sizes; None -> data over processes, fsdp over local devices.

    One axis may be -1 (take what is left). Raises UserError when sizes don't multiply to the
    device count.
    """
    if not spec:
        return {"data": n_processes, "fsdp": n_devices // n_processes, "tensor": 1}
    sizes = {a: 1 for a in MESH_AXES}
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in MESH_AXES:
            raise UserError(f"--mesh: bad entry {part!r}; expected e.g. data=2,fsdp=2,tensor=2")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"--mesh: {name} size {value!r} is not an integer") from None
    free = [a for a, s in sizes.items() if s == -1]
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"--mesh {spec!r}: sizes must be positive (at most one -1)")
    if free:
        sizes[free[0]] = n_devices // fixed
    if int(np.prod(list(sizes.values()))) != n_devices:
        raise UserError(f"--mesh {spec!r} needs {int(np.prod(list(sizes.values())))} devices, "
                        f"{n_devices} present")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices), jax.process_count())
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == len(jax.devices()):
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def spec_for(logical: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical name takes the mesh axes of RULES that divide its
    dimension and that no earlier dimension took; anything else stays replicated (tiny test
    shapes need not divide the mesh)."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = []
        for ax in RULES.get(name, ()) if name else ():
            n = mesh.shape[ax] * int(np.prod([mesh.shape[a] for a in axes]))
            if ax not in used and n > 1 and dim % n == 0:
                axes.append(ax)
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*out)


def shardings_for(logical_tree, shapes_tree, mesh: Mesh):
    """Tree of NamedSharding from a tree of logical-axis tuples and a matching tree of arrays or
    ShapeDtypeStructs."""
    return jax.tree.map(
        lambda lg, x: NamedSharding(mesh, spec_for(tuple(lg), tuple(x.shape), mesh)),
        logical_tree, shapes_tree, is_leaf=lambda t: isinstance(t, tuple))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
