"""`tools.tpu_compile --program online`: the whole online training step (train/online.py) compiled
for a TPU topology with abstract weights: the teacher's features forward (EasyDeL GPT-OSS, as
tools._tpu_teacher builds it, on its mesh) and the trainer's draft step (train.aot) on the mesh
laid over the same devices (train.online.shared_mesh), the features handed from one to the
other in the step's batch sharding (train.online.TeacherFeatures: the trainer's own program).

Per chip, the total is what the trainer's pre-flight counts (train.online.online_device_bytes):
the larger of the teacher phase (the forward's weights, temporaries and features + the draft
step's arguments) and the draft phase (the step with the next batch + the teacher's weights and
features); the programs run one after the other, so their temporaries never coexist. The step-time estimate is
model FLOPs (teacher forward 2 x active params x tokens + the draft step's) at the chips' peak.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import DraftConfig, build_target_layer_ids
from pipeline.errors import UserError
from pipeline.teacher.easydel_teacher import _forward
from pipeline.teacher import sharding
from pipeline.teacher.jax_setup import parse_axis_dims
from tools._tpu_report import (_peak, _xla_flops, memory_row, oom_row, teacher_hf_config,
                               train_config)
from tools._teacher_roofline import active_params
from tools._tpu_teacher import build_abstract
from tools.bench_gpu_step import flop_count
from train import aot
from train.online import TeacherFeatures, online_device_bytes, shared_mesh


def online_report(opts) -> dict:
    devices = aot.topology_devices(opts.topology)
    hf = teacher_hf_config(opts.teacher)
    cfg = train_config(opts, teacher=opts.teacher, seq_len=opts.seq_len,
                       teacher_layers=opts.num_features)
    dims = (parse_axis_dims(opts.sharding_axis_dims) if opts.sharding_axis_dims else
            sharding.default_axis_dims(len(devices), "tpu", int(hf.get("num_local_experts", 1))))
    if opts.batch_size % dims[0]:
        raise UserError(f"--batch-size {opts.batch_size} is not a multiple of the teacher mesh's "
                        f"dp={dims[0]}")
    layers = tuple(build_target_layer_ids(int(hf["num_hidden_layers"]), opts.num_features))
    t0 = time.perf_counter()
    graphdef, state, tmesh = build_abstract(hf, devices, dims)
    mesh = shared_mesh(cfg.mesh, tmesh)
    dcfg = DraftConfig.from_target(hf, num_draft_layers=cfg.draft_layers,
                                   block_size=cfg.block_size,
                                   mask_token_id=int(hf["vocab_size"]) - 1,
                                   num_features=opts.num_features, target_layer_ids=layers)
    n = max(1, min(cfg.anchors_per_seq, opts.seq_len - 1))
    prog = aot.step_program(cfg, dcfg, mesh, seq_len=opts.seq_len,
                            feature_dim=dcfg.num_features * dcfg.hidden_size, num_anchors=n)

    def fn(state, ids, mask):
        return _forward(graphdef, state, ids, mask, layer_ids=layers, logits_at=None)[0]

    features = TeacherFeatures(fn, state, tmesh, prog.batch_sh["features"])
    ids = jax.ShapeDtypeStruct((cfg.batch_size, opts.seq_len), jnp.int32,
                               sharding=prog.batch_sh["input_ids"])
    hbm = aot.device_hbm_bytes(devices[0], devices)
    parts = {}
    try:
        parts["teacher"] = memory_row(features.compile(ids), 0, hbm)
    except aot.DoesNotFit as e:
        parts["teacher"] = oom_row(e, hbm)
    try:
        compiled = prog.compile()
        parts["draft"] = memory_row(compiled, prog.batch_device_bytes(), hbm)
        flops_xla = _xla_flops(compiled)
    except aot.DoesNotFit as e:
        parts["draft"], flops_xla = oom_row(e, hbm), None
    seconds = time.perf_counter() - t0
    total = None
    if all(p.get("compile_error") is None for p in parts.values()):
        # the trainer's pre-flight figure: the larger of the teacher phase and the draft phase
        total = online_device_bytes(parts["draft"], parts["teacher"])
    mem = {k: parts["draft"].get(k) for k in ("arguments", "temp", "output", "alias", "code",
                                               "next_batch")}
    mem.update(total=total, hbm=hbm, teacher_total=parts["teacher"].get("total"),
               draft_total=parts["draft"].get("total"))
    mem["fits"] = (False if total is None else None if hbm is None else bool(total <= hbm))
    mem["margin"] = None if total is None or hbm is None else int(hbm - total)
    errors = [f"{k}: {p['compile_error']}" for k, p in parts.items() if p.get("compile_error")]
    if errors:
        mem["compile_error"] = "; ".join(errors)
    chip = aot.chip_for(devices[0])
    row = {"program": "online_step", "topology": opts.topology, "teacher": opts.teacher,
           "sharding_axis_dims": ",".join(map(str, dims)), "mesh": dict(mesh.shape),
           "batch_size": cfg.batch_size, "seq_len": opts.seq_len, "anchors_per_seq": n,
           "block_size": cfg.block_size, "draft_layers": cfg.draft_layers, "remat": cfg.remat,
           "attention": opts.attention, "compile_s": round(seconds, 1), "memory": mem,
           "parts": parts, "xla_flops": flops_xla, **_peak(devices, chip)}
    anchors = np.broadcast_to(np.linspace(0, opts.seq_len - cfg.block_size, n).astype(np.int64),
                              (cfg.batch_size, n))
    draft_flops = float(flop_count(dcfg, b=cfg.batch_size, seq_len=opts.seq_len,
                                   anchors=anchors, attention="xla")["model_flops"])
    teacher_flops = 2.0 * active_params(hf) * cfg.batch_size * opts.seq_len
    row.update(model_flops=draft_flops + teacher_flops, teacher_model_flops=teacher_flops,
               draft_model_flops=draft_flops)
    if row["peak_flops_total"]:
        row["step_s_estimate_at_peak"] = row["model_flops"] / row["peak_flops_total"]
    return row
