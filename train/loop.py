"""`train(cfg)`: the whole run — check the cache, build mesh/state/loader, resume from the latest
committed checkpoint, step, log, save, export. The CLI (`train.main`) only parses flags.
"""
from __future__ import annotations

import functools
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
from train import step as step_lib
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.loader import make_dataset, open_training_cache, to_global
from train.mesh import make_mesh
from train.metrics import MetricsWriter, summarize
from train.teacher_weights import load_embedding_and_head

# TrainConfig fields a rerun may change without changing the computation.
_FREE_FIELDS = {"progress", "log_every", "read_threads", "prefetch", "save_every",
                "keep_checkpoints", "out", "data"}


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
    return DraftConfig.from_target(
        hf_config, num_draft_layers=cfg.draft_layers, block_size=cfg.block_size,
        mask_token_id=int(manifest.mask_token_id), num_features=manifest.num_features,
        target_layer_ids=tuple(manifest.layer_ids), intermediate_size=cfg.intermediate_size)


def _check_run_dir(out: Path, cfg: TrainConfig, identity: dict) -> None:
    """Write <run>/run.json on the first run; on a rerun refuse a different cache or settings."""
    path = out / "run.json"
    mine = {"train": {k: v for k, v in cfg.to_dict().items() if k not in _FREE_FIELDS},
            "cache": identity}
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(mine)):
            diff = sorted(k for sec in ("train", "cache") for k in set(mine[sec]) | set(old[sec])
                          if mine[sec].get(k) != old[sec].get(k))
            raise UserError(f"{out} holds a run with different settings ({', '.join(diff)}); "
                            "use a new --out or the original flags")
    elif jax.process_index() == 0:
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


def train(cfg: TrainConfig, devices=None) -> dict:
    """Run (or resume) the training described by cfg on `devices` (default: all) -> summary."""
    t_start = time.time()
    out = Path(cfg.out)
    cache = open_training_cache(cfg.data)
    manifest = cache.manifest
    teacher_path, hf_config = teacher_config(manifest)
    dcfg = draft_config_for(cfg, manifest, hf_config)
    identity = {"teacher": manifest.teacher, "layer_ids": list(manifest.layer_ids),
                "hidden_size": manifest.hidden_size, "dtype": manifest.dtype,
                "seq_len": manifest.seq_len, "num_records": manifest.num_records}
    _check_run_dir(out, cfg, identity)

    mesh = make_mesh(cfg.mesh, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by data x fsdp = {shards}")
    cdt = jnp.dtype(cfg.compute_dtype)
    embed, head = load_embedding_and_head(teacher_path)
    if embed.shape != (dcfg.vocab_size, dcfg.hidden_size) or head.shape != embed.shape:
        raise UserError(f"teacher embedding {embed.shape} / head {head.shape} do not match "
                        f"vocab {dcfg.vocab_size} x hidden {dcfg.hidden_size}")
    frozen_np = {"embed": embed, "lm_head": head}
    frozen_sh = step_lib.frozen_shardings(mesh, frozen_np)
    # Cast on host, then place: no full [V, H] copy lands on one device first.
    frozen = {k: jax.device_put(np.asarray(v, dtype=cdt), frozen_sh[k])
              for k, v in frozen_np.items()}

    init = functools.partial(step_lib.init_state, cfg, dcfg)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
    state_sh = step_lib.state_shardings(cfg, dcfg, mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sh)

    data_it = iter(make_dataset(cache, global_batch=cfg.batch_size,
                                anchors_per_seq=cfg.anchors_per_seq, seed=cfg.seed,
                                read_threads=cfg.read_threads, prefetch=cfg.prefetch))
    ckpt = Checkpointer(out, keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, data_state = ckpt.restore(start, abstract)
        data_it.set_state(data_state)
        print(f"resumed from step {start}", file=sys.stderr)
    else:
        state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(cfg.seed))

    step_fn = step_lib.jit_step(cfg, dcfg, mesh, state_sh, frozen_sh)
    batch_sh = step_lib.batch_shardings(mesh)
    writer = MetricsWriter(out, enabled=jax.process_index() == 0)
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * manifest.seq_len  # sequence tokens streamed per step
    last, t_loop, n_run = {}, time.time(), 0
    for step in range(start, cfg.steps):
        batch = to_global(next(data_it), batch_sh)
        state, metrics = step_fn(state, frozen, batch)
        n_run += 1
        done = step + 1
        if step == start and done < cfg.steps:  # throughput excludes the compile of step one
            jax.block_until_ready(metrics)
            t_loop, n_run = time.time(), 0
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = summarize(jax.device_get(metrics))
            last["tokens_per_s"] = n_run * tokens_per_step / max(time.time() - t_loop, 1e-9)
            writer.write(done, last)
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % cfg.save_every == 0 or done == cfg.steps:
            ckpt.save(done, state, data_it.get_state())
            _write_msgpack(out, dcfg, _host_params(state["params"]))
    elapsed_loop = time.time() - t_loop
    ckpt.close()
    writer.close()
    if bar is not None:
        bar.close()
    final = _host_params(state["params"])  # collective: every process takes part
    if jax.process_index() == 0:
        # Exported in the compute dtype (bf16 by default, as z-lab ships its drafts).
        model.save_draft(out / "export", dcfg, final, dtype=cdt)
    if not last and (out / "metrics.jsonl").exists():  # rerun of a finished run: report it
        lines = (out / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    return {"steps": cfg.steps, "final_loss": last.get("loss"),
            "expected_tau": last.get("expected_tau"),
            "tokens_per_s": n_run * tokens_per_step / max(elapsed_loop, 1e-9),
            "seconds": time.time() - t_start}
