"""`train(cfg)`: the whole run — check --out and the cache, compile the step and check its memory
fits, then build state/loader, resume from the latest committed checkpoint, step, log, save,
export. Nothing is written before every check has passed. The CLI (`train.main`) only parses flags.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import model
from model.config import DraftConfig
from pipeline.errors import UserError
from train.checkpoint import Checkpointer
from pipeline.preempt import Preempted, StopOnSignal
from train.run_lock import run_lock
from train import aot, disk, memory
from train.config import TrainConfig
from train.guard import (CorruptFeaturesError, FiniteWatch, NonFiniteError, cache_fingerprint,
                         check_block_fits, check_out_dir, manifest_object)
from train.evaluate import Evaluator
from train.heldout import TrainView, heldout_indices
from train.loader import (features_checked_on_device, make_dataset, num_anchors_for,
                          open_training_cache, to_global)
from train.mesh import make_mesh
from train.step import attention_implementation
from train.metrics import MetricsWriter, summarize, truncate_metrics
from train.teacher_weights import load_embedding_and_head

# TrainConfig fields a rerun may change without changing the computation.
_FREE_FIELDS = {"progress", "log_every", "read_threads", "prefetch", "save_every",
                "keep_checkpoints", "out", "data", "memory_limit_gb", "eval_every"}


def teacher_config(manifest) -> tuple[Path, dict]:
    """The teacher snapshot the cache was dumped from and its HF config."""
    path = Path(manifest.teacher.get("path", ""))
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise UserError(f"teacher snapshot {path} recorded in the cache manifest has no "
                        "config.json (moved or deleted?)")
    want = manifest.teacher.get("config_sha256")
    if want and hashlib.sha256(cfg_path.read_bytes()).hexdigest() != want:
        raise UserError(f"teacher snapshot {path} changed since the cache was dumped "
                        "(config.json sha256 differs from the manifest)")
    return path, json.loads(cfg_path.read_text())


def draft_config_for(cfg: TrainConfig, manifest, hf_config: dict) -> DraftConfig:
    """Draft shape from the teacher; checks the manifest agrees with the teacher it names."""
    if int(hf_config["hidden_size"]) != manifest.hidden_size:
        raise UserError(f"cache hidden size {manifest.hidden_size} != teacher hidden size "
                        f"{hf_config['hidden_size']}")
    n_layers = int(hf_config["num_hidden_layers"])
    if any(not 0 <= i < n_layers for i in manifest.layer_ids):
        raise UserError(f"cache layer ids {manifest.layer_ids} outside the teacher's {n_layers}")
    if manifest.vocab_size is not None and int(manifest.vocab_size) != int(hf_config["vocab_size"]):
        raise UserError(f"cache vocab {manifest.vocab_size} != teacher vocab {hf_config['vocab_size']}")
    if manifest.mask_token_id is None:
        raise UserError("cache manifest records no mask_token_id")
    if not 0 <= int(manifest.mask_token_id) < int(hf_config["vocab_size"]):
        # an out-of-range id would silently clamp in the embedding gather on accelerators
        raise UserError(f"cache mask_token_id {manifest.mask_token_id} outside the teacher's "
                        f"vocab of {hf_config['vocab_size']}")
    return cfg.with_arch(DraftConfig.from_target(
        hf_config, num_draft_layers=cfg.draft_layers, block_size=cfg.block_size,
        mask_token_id=int(manifest.mask_token_id), num_features=manifest.num_features,
        target_layer_ids=tuple(manifest.layer_ids), intermediate_size=cfg.intermediate_size))


def _check_run_dir(out: Path, cfg: TrainConfig, identity: dict, create: bool = True) -> None:
    """Write <run>/run.json on the first run (when `create`); on a rerun refuse a different cache
    (its content too, not just its shapes) or settings."""
    path = out / "run.json"
    mine = {"train": {k: v for k, v in cfg.to_dict().items() if k not in _FREE_FIELDS},
            "cache": identity}
    if path.exists():
        old = json.loads(path.read_text())
        # a field added since the run began (e.g. the online ones): that run used its default
        added = {k: v for k, v in TrainConfig().to_dict().items()
                 if k in mine["train"] and k not in old["train"]}
        old["train"] = {**json.loads(json.dumps(added)), **old["train"]}
        if "content" in old["cache"] and old["cache"]["content"] != identity.get("content"):
            raise UserError(f"--data {cfg.data} holds other data than the cache {out} was "
                            "trained on (content fingerprint differs: same shapes, different "
                            "records); resume with the original cache or use a new --out")
        if "content" not in old["cache"]:  # a run started before content was recorded
            mine["cache"] = {k: v for k, v in identity.items() if k != "content"}
        if old != json.loads(json.dumps(mine)):
            diff = sorted(k for sec in ("train", "cache") for k in set(mine[sec]) | set(old[sec])
                          if mine[sec].get(k) != old[sec].get(k))
            raise UserError(f"{out} holds a run with different settings ({', '.join(diff)}); "
                            "use a new --out or the original flags")
    elif create and jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("run.json.tmp")  # atomic: other processes may be reading it
        tmp.write_text(json.dumps(mine, indent=1))
        os.replace(tmp, path)


def _host_params(params):
    if jax.process_count() > 1:  # global arrays spanning processes: gather them whole (tiled)
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(params))


def _write_msgpack(out: Path, dcfg, params) -> None:
    """<run>/draft_params.msgpack, replaced atomically (a kill mid-write keeps the previous one)."""
    if jax.process_index() == 0:
        tmp = out / "draft_params.msgpack.tmp"
        model.save_msgpack(tmp, dcfg, params)
        os.replace(tmp, out / "draft_params.msgpack")


def _estimate_memory(cfg: TrainConfig, manifest, mesh, compiled, abstract, batch_abs,
                     evaluator=None, frozen_abs=None, batch_bytes=None, loader=None):
    """The step's memory (train/memory.py) for this process: compiled step per local device,
    loader buffers and save copies (online training passes its own batch and loader bytes), and
    the held-out evaluation forward's peak."""
    evals = (memory.eval_device_bytes(evaluator.compile(abstract["params"], frozen_abs), abstract)
             if evaluator is not None else 0)
    pc = jax.process_count()
    direct = manifest.format == "tensorstore" and manifest.hosts in (1, pc)
    if loader is None:
        loader = memory.loader_buffer_bytes(manifest, batch=cfg.batch_size // pc,
                                            prefetch=cfg.prefetch, read_threads=cfg.read_threads,
                                            direct=direct)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_bytes is None:
        batch_bytes = memory.tree_bytes(batch_abs) // shards
    return memory.estimate_memory(
        compiled, batch_device_bytes=batch_bytes,
        local_devices=[d for d in mesh.devices.flat if d.process_index == jax.process_index()],
        loader_bytes=loader, state_bytes=memory.tree_bytes(abstract) // pc,
        params_bytes=memory.tree_bytes(abstract["params"]), limit_gb=cfg.memory_limit_gb,
        eval_device_bytes=evals)


def eval_split(cfg: TrainConfig, cache, manifest):
    """(training cache view, eval cache, held-out indices into the eval cache): --eval-data's
    first eval_max sequences, or eval_fraction of --data held out of training."""
    if cfg.eval_data:
        other = open_training_cache(cfg.eval_data)
        m = other.manifest
        mine = (tuple(manifest.layer_ids), manifest.hidden_size, manifest.mask_token_id,
                manifest.vocab_size)
        theirs = (tuple(m.layer_ids), m.hidden_size, m.mask_token_id, m.vocab_size)
        if mine != theirs:
            raise UserError(f"--eval-data {cfg.eval_data} (layers, hidden, mask id, vocab "
                            f"{theirs}) was not dumped like --data {cfg.data} ({mine})")
        return cache, other, np.arange(min(len(other), cfg.eval_max), dtype=np.int64)
    held = heldout_indices(len(cache), cfg.eval_fraction, cfg.eval_max, cfg.seed)
    return (TrainView(cache, held) if len(held) else cache), cache, held


def _eval_due(cfg: TrainConfig, done: int) -> bool:
    return done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0)


def _last_rows(path: Path) -> tuple[dict, dict]:
    """The last training and held-out rows of metrics.jsonl (a rerun of a finished run)."""
    train_row, eval_row = {}, {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                train_row = row
            if "eval_sim_tau" in row:
                eval_row = row
    return train_row, eval_row


def _write_json(path: Path, obj) -> None:
    if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)


def train(cfg: TrainConfig, devices=None) -> dict:
    """Run (or resume) the training described by cfg on `devices` (default: all) -> summary.
    Holds --out's lock (train/run_lock.py); SIGTERM stops after a save (train/preempt.py)."""
    check_out_dir(Path(cfg.out))  # before anything is written or compiled
    with run_lock(cfg.out), StopOnSignal() as stop, disk.quiet_no_space():
        try:
            return _run(cfg, devices, stop)
        except Exception as e:  # a full disk inside Orbax or a write: one line (train/disk.py)
            if isinstance(e, UserError) or not disk.is_no_space(e):
                raise
            raise UserError(disk.no_space_message(cfg.out)) from None


def _run(cfg: TrainConfig, devices, stop: StopOnSignal) -> dict:
    t_start = time.time()
    out = Path(cfg.out)
    online = None  # --teacher: features computed in the loop (train/online.py), no cache
    if cfg.teacher:
        from train.online import open_online  # loads easydel: never on the cache path
        online = open_online(cfg, devices)
        cache, manifest = online.tokens, online.manifest
        teacher_path, hf_config, identity = online.teacher_path, online.hf_config, online.identity
    else:
        manifest_object(Path(cfg.data) / "manifest.json")  # JSON but not an object: one line
        cache = open_training_cache(cfg.data)
        manifest = cache.manifest
        teacher_path, hf_config = teacher_config(manifest)
        identity = {"teacher": manifest.teacher, "layer_ids": list(manifest.layer_ids),
                    "hidden_size": manifest.hidden_size, "dtype": manifest.dtype,
                    "seq_len": manifest.seq_len, "num_records": manifest.num_records,
                    "content": cache_fingerprint(cfg.data, manifest)}
    check_block_fits(cfg.block_size, manifest.seq_len)
    dcfg = draft_config_for(cfg, manifest, hf_config)
    _check_run_dir(out, cfg, identity, create=False)
    train_cache, eval_cache, heldout = eval_split(cfg, cache, manifest)

    mesh = online.mesh if online else make_mesh(cfg.mesh, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by data x fsdp = {shards}")
    cdt = jnp.dtype(cfg.compute_dtype)
    # Compile before allocating anything: its memory analysis decides whether the run can fit
    # (the first real call reuses this compilation). tools.tpu_compile compiles this same
    # program for a TPU topology (train/aot.py).
    # the step checks the features it trains on against the dump's sums (feature_sums.py)
    device_checks = not online and features_checked_on_device(train_cache)
    prog = aot.step_program(cfg, dcfg, mesh, seq_len=manifest.seq_len,
                            feature_dim=manifest.feature_dim,
                            num_anchors=num_anchors_for(manifest, cfg.anchors_per_seq),
                            feature_sums=device_checks)
    init, abstract, state_sh, frozen_sh = prog.init, prog.state, prog.state_sh, prog.frozen_sh
    step_fn, batch_sh, batch_abs = prog.step_fn, prog.batch_sh, prog.batch
    compiled = aot.compile_or_refuse(prog, cfg)  # a TPU compile refuses an HBM overflow
    evaluator = ((online.evaluator if online else Evaluator)(
        cfg, dcfg, mesh, eval_cache, heldout, state_sh["params"], frozen_sh)
        if len(heldout) else None)  # compiled now: its forward is in the estimate
    if online:  # adds the teacher forward; refuses naming the online flags
        estimate, _ = online.estimate_memory(
            cfg, prog, compiled, lambda c, b, loader: _estimate_memory(
                cfg, manifest, mesh, c, abstract, batch_abs, evaluator, prog.frozen,
                batch_bytes=b, loader=loader))
    else:
        estimate = _estimate_memory(cfg, manifest, mesh, compiled, abstract, batch_abs, evaluator,
                                    prog.frozen)
    memory.check_fits(estimate, cfg)
    if jax.process_index() == 0:
        counts = model.param_counts(dcfg)  # DFlash2: its codebooks are most of the extra state
        print(f"draft: {dcfg.arch}, {counts['total']:,} params ("
              + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total" and v)
              + ")", file=sys.stderr)
        print(f"memory estimate: {memory.describe(estimate)}", file=sys.stderr)
    _check_run_dir(out, cfg, identity)  # the first run writes run.json (and creates --out)
    _write_json(out / "memory.json", estimate.to_dict())

    embed, head = load_embedding_and_head(teacher_path)
    if embed.shape != (dcfg.vocab_size, dcfg.hidden_size) or head.shape != embed.shape:
        raise UserError(f"teacher embedding {embed.shape} / head {head.shape} do not match "
                        f"vocab {dcfg.vocab_size} x hidden {dcfg.hidden_size}")
    # Cast on host, then place: no full [V, H] copy lands on one device first.
    frozen = {k: jax.device_put(np.asarray(v, dtype=cdt), frozen_sh[k])
              for k, v in (("embed", embed), ("lm_head", head))}
    del embed, head  # the host copies are not needed again

    data_it = iter(make_dataset(train_cache, global_batch=cfg.batch_size,
                                anchors_per_seq=cfg.anchors_per_seq, seed=cfg.seed,
                                read_threads=cfg.read_threads, prefetch=cfg.prefetch,
                                device_checks=device_checks))
    if online:  # device batches with features; the next one's teacher forward runs ahead
        data_it = online.batches(data_it, batch_sh)
    ckpt = Checkpointer(out, keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, data_state = ckpt.restore(start, abstract)
        data_it.set_state(data_state)
        print(f"resumed from step {start}", file=sys.stderr)
    else:
        state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(cfg.seed))

    if jax.process_index() == 0:
        truncate_metrics(out / "metrics.jsonl", start)  # replayed steps are logged again
    writer = MetricsWriter(out, enabled=jax.process_index() == 0)
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * manifest.seq_len  # sequence tokens streamed per step
    last, last_eval, t_loop, n_run = {}, {}, time.time(), 0
    watch, last_saved = FiniteWatch(cfg.data, getattr(cache, "describe", None)), start or None
    try:
        for step in range(start, cfg.steps):
            records = None
            if online:
                batch = next(data_it)
            else:
                host_batch = next(data_it)
                batch, records = to_global(host_batch, batch_sh), host_batch["index"]
            state, metrics = step_fn(state, frozen, batch)
            watch.add(step + 1, metrics, records)
            n_run += 1
            done = step + 1
            if step == start and done < cfg.steps:  # throughput excludes the compile of step one
                jax.block_until_ready(metrics)
                t_loop, n_run = time.time(), 0
            if done % cfg.log_every == 0 or done == cfg.steps:
                watch.check(last_saved)  # before a non-finite step is logged
                last = summarize(jax.device_get(metrics))
                last["tokens_per_s"] = n_run * tokens_per_step / max(time.time() - t_loop, 1e-9)
                writer.write(done, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if evaluator is not None and _eval_due(cfg, done):
                watch.check(last_saved)  # a non-finite state is not worth evaluating
                last_eval = evaluator(state["params"], frozen)
                writer.write(done, last_eval)
            if bar is not None:
                bar.update(1)
            if done % cfg.save_every == 0 or done == cfg.steps:
                watch.check(last_saved)  # never save a non-finite state
                ckpt.save(done, state, data_it.get_state())
                _write_msgpack(out, dcfg, _host_params(state["params"]))
                last_saved = done
            if done < cfg.steps and stop.should_stop(sync=done % cfg.log_every == 0):
                if last_saved != done:
                    watch.check(last_saved)
                    ckpt.save(done, state, data_it.get_state())
                    _write_msgpack(out, dcfg, _host_params(state["params"]))
                raise Preempted(f"stopped by SIGTERM after step {done} of {cfg.steps}, saved "
                                f"in {out}; rerun the same command to resume")
    except (NonFiniteError, CorruptFeaturesError, Preempted):
        ckpt.close()  # the good checkpoints still being written are committed
        writer.close()
        if bar is not None:
            bar.close()
        raise
    elapsed_loop = time.time() - t_loop
    ckpt.close()
    writer.close()
    if bar is not None:
        bar.close()
    final = _host_params(state["params"])  # collective: every process takes part
    if jax.process_index() == 0:
        # Exported in the compute dtype (bf16 by default, as z-lab ships its drafts).
        model.save_draft(out / "export", dcfg, final, dtype=cdt)
    if not last:  # rerun of a finished run: report it
        last, last_eval = _last_rows(out / "metrics.jsonl")
    return {"steps": cfg.steps, "final_loss": last.get("loss"),
            "expected_tau": last.get("expected_tau"),
            "tokens_per_s": n_run * tokens_per_step / max(elapsed_loop, 1e-9),
            "seconds": time.time() - t_start, "memory": estimate.to_dict(),
            "eval": {k[5:]: v for k, v in last_eval.items() if k.startswith("eval_")} or None,
            "attention": attention_implementation(cfg)}
