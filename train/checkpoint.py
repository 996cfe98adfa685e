"""Orbax checkpoints of a run: train state (params, AdamW state, step, rng) and the Grain iterator
position, saved together as one step directory.

Orbax writes each step to a temporary directory and renames it when every item is written (its
commit marker), so a kill -9 mid-save leaves nothing `latest_step` would pick; saves run async
(the device arrays are copied to host before `save` returns, so the donated state may be reused).
The iterator state is captured as JSON at the call, not when the async write runs.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """keep-last-N async checkpoints under <run>/checkpoints."""

    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        if jax.process_index() == 0:  # a save cut short (full disk, kill) left these behind
            from train.disk import remove_stale_tmp
            remove_stale_tmp(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """Latest committed step (uncommitted temp dirs are ignored), or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        from train.disk import check_space
        # what this save and the msgpack beside it write (params are a quarter of AdamW's state),
        # per process, plus slack for Orbax's metadata
        local = sum(s.data.nbytes for x in jax.tree.leaves(state) if hasattr(x, "addressable_shards")
                    for s in x.addressable_shards if s.replica_id == 0)
        check_space(self.directory, local * 4 // 3 + (1 << 20))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """-> (state laid out as `abstract_state`'s shardings, iterator state dict)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params_on_host(run_dir: str | Path, step: int | None = None):
    """(step, params as numpy) of a run's latest (or given) committed checkpoint, on any topology.

    The checkpoint records the shardings it was saved with; on another machine (export after a
    pod run) those devices do not exist, so the target is rebuilt from the stored shapes and
    placed on one local device.
    """
    import numpy as np

    directory = Path(run_dir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(
        directory, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no committed checkpoint")
        meta = manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
    finally:
        manager.close()
    return step, jax.tree.map(np.asarray, state["params"])
