"""What `tools.tpu_compile` compiles and reports: built-in teacher configs, the draft step
(train.aot, the trainer's own program) and the teacher forward (tools._tpu_teacher), per-chip
memory from XLA's compiled memory analysis, fit against the chip's HBM, flops and a step-time
estimate. No array is ever allocated; the devices are a libtpu topology's."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from tools._teacher_roofline import teacher_roofline

GiB = 1 << 30

_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
         "original_max_position_embeddings": 4096, "truncate": False}


def _gpt_oss(layers: int, experts: int) -> dict:
    """openai/gpt-oss-{20b,120b} config.json (the fields any loader reads; no weights needed)."""
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "vocab_size": 201_088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 64, "num_local_experts": experts, "num_experts_per_tok": 4,
            "experts_per_token": 4, "sliding_window": 128, "max_position_embeddings": 131_072,
            "initial_context_length": 4096, "rope_theta": 150_000.0, "rope_scaling": dict(_ROPE),
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
            "attention_bias": True, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "swiglu_limit": 7.0, "pad_token_id": 199_999, "eos_token_id": 200_002}


def _tiny() -> dict:
    """The embedded tiny teacher's shapes (pipeline.teacher.tiny_recipe.TinyTeacherConfig)."""
    from pipeline.teacher.tiny_recipe import TinyTeacherConfig

    t = TinyTeacherConfig()
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "num_local_experts": t.num_local_experts, "num_experts_per_tok": t.num_experts_per_tok,
            "experts_per_token": t.num_experts_per_tok, "sliding_window": t.sliding_window,
            "max_position_embeddings": int(t.yarn_original_max_position * t.yarn_factor),
            "rope_theta": t.rope_theta,
            "rope_scaling": {"rope_type": "yarn", "factor": t.yarn_factor, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": t.yarn_original_max_position},
            "layer_types": ["sliding_attention", "full_attention"] * (t.num_hidden_layers // 2),
            "attention_bias": True, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "swiglu_limit": 7.0}


BUILTIN = {"gpt-oss-20b": lambda: _gpt_oss(24, 32), "gpt-oss-120b": lambda: _gpt_oss(36, 128),
           "tiny": _tiny}


def teacher_hf_config(name: str) -> dict:
    """A built-in name, or a path to an HF config.json (or a snapshot dir holding one)."""
    if name in BUILTIN:
        return BUILTIN[name]()
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--teacher {name}: not a built-in ({', '.join(BUILTIN)}) and not a "
                        f"readable config.json ({e})") from None
    if not isinstance(cfg, dict) or "hidden_size" not in cfg:
        raise UserError(f"--teacher {name}: config.json has no hidden_size (not an HF config)")
    return cfg


def memory_row(compiled, extra_device_bytes: int, hbm: int | None) -> dict:
    """Per-chip bytes from XLA's memory analysis; `total` as train.memory counts a step (the
    same function), plus `extra_device_bytes` (the next batch)."""
    from train.memory import step_device_bytes

    m = compiled.memory_analysis()
    total = step_device_bytes(compiled, extra_device_bytes)
    row = {"arguments": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes), "next_batch": int(extra_device_bytes),
           "total": int(total), "hbm": hbm}
    row["fits"] = None if hbm is None else bool(total <= hbm)
    row["margin"] = None if hbm is None else int(hbm - total)
    return row


def oom_row(e, hbm: int | None) -> dict:
    """The memory row of a program the TPU compiler refused for exceeding HBM."""
    used = e.used
    return {"arguments": e.parts.get("arguments"), "temp": None, "output": None, "alias": None,
            "code": None, "program": e.parts.get("program"),
            "next_batch": None, "total": used, "hbm": e.available or hbm, "fits": False,
            "margin": None if used is None else int((e.available or hbm) - used),
            "compile_error": str(e)}


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _peak(devices, chip) -> dict:
    return {"chips": len(devices), "chip": chip.name if chip else None,
            "peak_flops_total": chip.peak_bf16_flops * len(devices) if chip else None}


def train_config(opts, **extra):
    """The trainer's TrainConfig from tpu_compile's flags (the trainer's own names), plus
    `extra` fields; a bad value is one line."""
    from train.config import TrainConfig

    try:
        return TrainConfig(batch_size=opts.batch_size, anchors_per_seq=opts.anchors_per_seq,
                           block_size=opts.block_size, draft_layers=opts.draft_layers,
                           mesh=opts.mesh, remat=opts.remat, attention=opts.attention,
                           progress=False, arch=getattr(opts, "arch", "dflash"), **extra)
    except ValueError as e:
        raise UserError(str(e)) from None


def draft_report(opts) -> dict:
    """Compile the trainer's step for opts.topology; opts carries the trainer's flags."""
    from model.config import DraftConfig
    from tools.bench_gpu_step import flop_count
    from train import aot, step as step_lib
    from train.mesh import make_mesh

    devices = aot.topology_devices(opts.topology)
    hf = teacher_hf_config(opts.teacher)
    cfg = train_config(opts)
    if opts.block_size >= opts.seq_len:
        raise UserError(f"--block-size {opts.block_size} must be below --seq-len {opts.seq_len}")
    dcfg = cfg.with_arch(DraftConfig.from_target(
        hf, num_draft_layers=cfg.draft_layers, block_size=cfg.block_size,
        mask_token_id=int(hf["vocab_size"]) - 1, num_features=opts.num_features))
    n = max(1, min(cfg.anchors_per_seq, opts.seq_len - 1))
    mesh = make_mesh(cfg.mesh, devices)
    # a dump's cache carries feature sums: the step the trainer runs checks them on the device
    prog = aot.step_program(cfg, dcfg, mesh, seq_len=opts.seq_len,
                            feature_dim=dcfg.num_features * dcfg.hidden_size, num_anchors=n,
                            feature_sums=True)
    with aot.target_backend(prog.platform):
        resolved = step_lib.attention_implementation(cfg)
    t0 = time.perf_counter()
    hbm = aot.device_hbm_bytes(devices[0], devices)
    try:
        compiled = prog.compile()
        mem, flops_xla = memory_row(compiled, prog.batch_device_bytes(), hbm), _xla_flops(compiled)
    except aot.DoesNotFit as e:  # the TPU compiler refuses what exceeds HBM: no analysis then
        mem, flops_xla = oom_row(e, hbm), None
    seconds = time.perf_counter() - t0
    chip = aot.chip_for(devices[0])
    row = {"program": "draft_step", "topology": opts.topology, "teacher": opts.teacher,
           "mesh": dict(mesh.shape), "batch_size": cfg.batch_size, "seq_len": opts.seq_len,
           "anchors_per_seq": n, "block_size": cfg.block_size, "draft_layers": cfg.draft_layers,
           "remat": cfg.remat, "attention": opts.attention, "arch": cfg.arch,
           "attention_resolved": resolved, "compile_s": round(seconds, 1),
           "memory": mem, "xla_flops": flops_xla, **_peak(devices, chip)}
    # Anchors spread evenly over the sequence: the expected visible context of a uniform draw.
    anchors = np.broadcast_to(np.linspace(0, opts.seq_len - cfg.block_size, n).astype(np.int64),
                              (cfg.batch_size, n))
    flops = flop_count(dcfg, b=cfg.batch_size, seq_len=opts.seq_len, anchors=anchors,
                       attention="xla")  # model FLOPs: the same for every kernel
    row["model_flops"] = float(flops["model_flops"])
    if row["peak_flops_total"]:
        row["step_s_estimate_at_peak"] = row["model_flops"] / row["peak_flops_total"]
    return row


def teacher_report(opts) -> dict:
    """Compile the dump's teacher forward (features of K layers) for opts.topology, with the
    dump's defaults: its mesh (pipeline.teacher.sharding) unless --sharding-axis-dims, and its
    TPU attention (blocksparse, T padded as the teacher pads it) unless --teacher-attention."""
    from pipeline.teacher import sharding
    from pipeline.teacher.attention import run_length
    from pipeline.teacher.jax_setup import parse_axis_dims
    from model.config import build_target_layer_ids
    from tools._tpu_teacher import compile_forward
    from train import aot

    devices = aot.topology_devices(opts.topology)
    hf = teacher_hf_config(opts.teacher)
    if opts.sharding_axis_dims is None:
        dims = sharding.default_axis_dims(len(devices), "tpu", int(hf.get("num_local_experts", 1)))
    else:
        dims = parse_axis_dims(opts.sharding_axis_dims)
    attention = getattr(opts, "teacher_attention", "blocksparse")
    length = run_length(opts.seq_len, attention, max_positions=hf.get("max_position_embeddings"))
    layers = build_target_layer_ids(int(hf["num_hidden_layers"]), opts.num_features)
    hbm = aot.device_hbm_bytes(devices[0], devices)
    try:
        compiled, seconds, mesh = compile_forward(hf, devices, dims, batch=opts.batch_size,
                                                  seq_len=length, layer_ids=layers,
                                                  attention=attention)
        mem, flops_xla = memory_row(compiled, 0, hbm), _xla_flops(compiled)
    except aot.DoesNotFit as e:  # weights or activations exceed HBM: the compiler's own split
        seconds, mesh, mem, flops_xla = e.seconds, e.mesh, oom_row(e, hbm), None
    chip = aot.chip_for(devices[0])
    row = {"program": "teacher_forward", "topology": opts.topology, "teacher": opts.teacher,
           "sharding_axis_dims": ",".join(map(str, dims)), "mesh": dict(mesh.shape),
           "attention": attention, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
           "run_seq_len": length, "layer_ids": list(layers), "compile_s": round(seconds, 1),
           "memory": mem, "xla_flops": flops_xla, **_peak(devices, chip)}
    row.update(teacher_roofline(hf, opts.batch_size, opts.seq_len, length, layers, chip,
                                len(devices), mem))
    return row


def _g(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def format_table(row: dict) -> str:
    m = row["memory"]
    fit = ("unknown (no HBM figure for this chip)" if m["fits"] is None else
           f"{'FITS' if m['fits'] else 'DOES NOT FIT'} (margin {_g(m['margin'])})")
    lines = [f"{row['program']} on {row['topology']} ({row['chips']} x {row['chip']}), "
             f"mesh {row['mesh']}, compiled in {row['compile_s']} s",
             "per chip:  arguments  temp  output (aliased)  code  next batch  = total / HBM"]
    if m.get("compile_error"):
        lines.append(f"  XLA refused it: {m['compile_error']}")
        if m.get("program") is not None or m.get("arguments") is not None:
            lines.append(f"  the compiler's split: arguments {_g(m.get('arguments'))}, "
                         f"program (temp) {_g(m.get('program'))}")
    lines.append(f"  {_g(m['arguments'])}  {_g(m['temp'])}  {_g(m['output'])} "
                 f"({_g(m['alias'])})  {_g(m['code'])}  {_g(m['next_batch'])}  = "
                 f"{_g(m['total'])} / {_g(m['hbm'])}: {fit}")
    if row.get("xla_flops") is not None:
        lines.append(f"XLA flops (per chip, loop bodies counted once): {row['xla_flops']:.3e}")
    if row.get("roofline_tokens_per_s") is not None:
        mem_s = row["roofline_memory_s"]
        lines.append(f"roofline ESTIMATE: {row['model_flops']:.3e} model FLOPs per forward; "
                     f"compute {row['roofline_compute_s'] * 1e3:.0f} ms, HBM "
                     f"{'-' if mem_s is None else f'{mem_s * 1e3:.1f} ms'} "
                     f"({row['roofline_bound']}-bound): {row['roofline_tokens_per_s']:,.0f} "
                     "tokens/s at 100% of peak")
    elif row.get("model_flops") is not None:
        est = row.get("step_s_estimate_at_peak")
        lines.append(f"model FLOPs per step {row['model_flops']:.3e}" + (
            f"; step time ESTIMATE at 100% of peak {est * 1e3:.0f} ms, at 40% MFU "
            f"{est / 0.4 * 1e3:.0f} ms" if est else ""))
    return "\n".join(lines)
