"""What a training step will hold in memory, estimated before the first step, and the refusal
when it cannot fit (issue 11: the kernel killed a run at 21 GB that a number could have predicted).

    estimate = estimate_memory(compiled_step, ...)   # after jit(...).lower(...).compile()
    check_fits(estimate, cfg)                        # UserError naming the flags that shrink it

Per device: the compiled step's own accounting (`memory_analysis()`): arguments + outputs - the
donated bytes they share + XLA temporaries + code, plus the next batch, which the loop places while
the step runs. On the host: the Grain loader's buffers (records in flight and prefetched batches,
computed here from the manifest and the loader settings) and the copies a save makes (Orbax copies
the state to host; draft_params.msgpack is a float32 copy of the params and its serialized bytes).
CPU "devices" are host memory, so there every device's share is added to the host's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from pipeline.errors import UserError
from pipeline.hostmem import host_available_bytes  # noqa: F401  (re-exported: tests, tools)

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    step_device_bytes: int  # per device: the compiled step + the next batch
    local_devices: int
    device_limit_bytes: int | None  # per device free accelerator memory; None: devices are host RAM
    loader_bytes: int
    save_bytes: int
    host_bytes: int  # everything that lands in host RAM
    host_available_bytes: int
    process_rss_bytes: int  # this process's resident set at the estimate (runtime, compile)
    # per device: the held-out evaluation forward (its program and batch) plus the optimizer
    # state that stays resident beside it; the peak is the larger of it and the step
    eval_device_bytes: int = 0

    @property
    def peak_device_bytes(self) -> int:
        return max(self.step_device_bytes, self.eval_device_bytes)

    @property
    def predicted_peak_rss_bytes(self) -> int:
        """Resident set the run should peak at: what it holds now plus what the step adds."""
        return self.process_rss_bytes + self.host_bytes

    def fits(self) -> bool:
        if self.device_limit_bytes is not None and self.peak_device_bytes > self.device_limit_bytes:
            return False
        return self.host_bytes <= self.host_available_bytes

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), predicted_peak_rss_bytes=self.predicted_peak_rss_bytes)


def compiled_device_bytes(compiled) -> int:
    """Peak bytes per device of a compiled program: what it reads, writes (minus donated buffers
    it writes in place), its temporaries and its code."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def loader_buffer_bytes(manifest, *, batch: int, prefetch: int, read_threads: int,
                        direct: bool) -> int:
    """Bytes the per-process loader (train/loader.py `make_dataset`) holds at most.

    ArrayRecord: each Grain element is a whole record (its features are views of the record
    bytes): `prefetch` buffered + one per read thread, then the batch being stacked and the one the
    loop holds. TensorStore (`direct`): elements are tokens only; features are read into batches,
    of which a thread prefetches max(1, prefetch // batch), one is being filled, one is held."""
    record = manifest.record_nbytes
    tokens = manifest.seq_len * 5  # int32 ids + uint8 mask
    if direct:
        batches = max(1, prefetch // batch) + 2
        return (prefetch + read_threads) * tokens + batches * batch * record
    return (prefetch + read_threads) * record + 2 * batch * record


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def process_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_free_bytes(devices) -> int | None:
    """Smallest free memory over `devices` (bytes_limit - bytes_in_use); for a TPU that reports
    no stats (a topology's devices, compiled for ahead of time) its chip's HBM
    (train.aot.CHIPS); None when the devices are host RAM (CPU)."""
    from train.aot import device_hbm_bytes

    free = []
    for d in devices:
        try:
            stats = d.memory_stats() if d.platform != "cpu" else None
        except Exception:  # not addressable (a topology device): no runtime to ask
            stats = None
        if not stats or "bytes_limit" not in stats:
            hbm = device_hbm_bytes(d, devices)
            if hbm is None:
                return None
            free.append(hbm)
            continue
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def step_device_bytes(compiled, batch_device_bytes: int) -> int:
    """What a training step holds per device: the compiled step and the next batch, which the
    loop places while the step runs. The trainer's check and tools.tpu_compile both use this."""
    return compiled_device_bytes(compiled) + batch_device_bytes


def estimate_memory(compiled, *, batch_device_bytes: int, local_devices: list,
                    loader_bytes: int, state_bytes: int, params_bytes: int,
                    limit_gb: float | None = None, eval_device_bytes: int = 0) -> MemoryEstimate:
    step = step_device_bytes(compiled, batch_device_bytes)
    limit = device_free_bytes(local_devices)
    save = state_bytes + 2 * params_bytes
    peak = max(step, eval_device_bytes)  # the evaluation runs between steps, not beside one
    host = loader_bytes + save + (peak * len(local_devices) if limit is None else 0)
    return MemoryEstimate(step_device_bytes=step, local_devices=len(local_devices),
                          device_limit_bytes=limit, loader_bytes=loader_bytes, save_bytes=save,
                          host_bytes=host, host_available_bytes=host_available_bytes(limit_gb),
                          process_rss_bytes=process_rss_bytes(),
                          eval_device_bytes=eval_device_bytes)


def eval_device_bytes(compiled_eval, abstract_state) -> int:
    """Per device while the held-out forward runs: its compiled program (params, frozen and its
    batch are its arguments) plus the optimizer state resident beside it (not an argument)."""
    resident = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for k, v in abstract_state.items() if k != "params"
                   for x in jax.tree.leaves(v))
    return compiled_device_bytes(compiled_eval) + resident


def _b(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def describe(e: MemoryEstimate) -> str:
    where = (f"{_b(e.step_device_bytes)} per device (of {_b(e.device_limit_bytes)} free)"
             if e.device_limit_bytes is not None else
             f"{e.local_devices} CPU device(s) x {_b(e.step_device_bytes)}")
    if e.eval_device_bytes:
        where += f", held-out evaluation {_b(e.eval_device_bytes)} per device"
    return (f"step {where}, loader {_b(e.loader_bytes)}, checkpoint copies {_b(e.save_bytes)}: "
            f"host needs {_b(e.host_bytes)} of {_b(e.host_available_bytes)} available")


def check_fits(e: MemoryEstimate, cfg) -> None:
    """UserError (one line) when the step cannot fit, naming the flags that shrink it."""
    ok = e.fits()
    if jax.process_count() > 1:  # every process stops, or none: a lone survivor would hang
        from jax.experimental import multihost_utils
        ok = bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))
    if ok:
        return
    evals = (f" (the held-out evaluation forward, {_b(e.eval_device_bytes)} per device, is the "
             "peak; --eval-fraction 0 turns it off)"
             if e.eval_device_bytes > e.step_device_bytes else "")
    if e.device_limit_bytes is not None and e.peak_device_bytes > e.device_limit_bytes:
        what = f"needs {_b(e.peak_device_bytes)} per device, {_b(e.device_limit_bytes)} free"
    elif e.fits():
        what = "does not fit on another process"
    else:
        what = (f"needs {_b(e.host_bytes)} of host memory, {_b(e.host_available_bytes)} "
                f"available ({describe(e)})")
    remat = "" if cfg.remat else " or --remat"
    raise UserError(f"the training step will not fit in memory: it {what}; shrink it with "
                    f"--batch-size (now {cfg.batch_size}), --anchors-per-seq (now "
                    f"{cfg.anchors_per_seq}){remat}, or raise --memory-limit-gb if more is free"
                    f"{evals}")
