"""Online training: the teacher inside the training loop, for data no feature cache can hold.

    python -m train.main --teacher openai/gpt-oss-20b --data chats.jsonl --out runs/online

`open_online(cfg)` is the feature source `train.loop.train` consumes instead of a cache when
--teacher is given (the cache path never imports this module, nor easydel):
  - tokens: --data read and tokenized exactly as `pipeline.teacher_dump` would (same
    DumpConfig, same `default_sequences`, same manifest: layer ids, mask id, vocab), held in
    memory (train/tokens.py); the Grain loader shuffles and draws anchors over them as over a
    cache of the same data, so the data position in the checkpoint is a position over raw
    sequences and a resume replays the same batches;
  - one mesh: the teacher is loaded (EasyDeL) on its own mesh, and the draft's mesh (data,
    fsdp, tensor) is laid over the same devices in the same order (`shared_mesh`), so one
    program can take the teacher's weights and hand features to the draft's layout;
  - features: `TeacherFeatures` is the teacher's forward jitted once, token ids (already on the
    devices) in, bfloat16 features out in the draft step's batch sharding: they go from the
    teacher to the step device to device, rounded to bf16 as a cache stores them (so online and
    cache training see the same numbers). The loop dispatches it for the next batch right after
    it dispatched the step on the current one: both are queued asynchronously, and the host
    waits for neither;
  - memory: the pre-flight adds the compiled teacher forward (its weights, its temporaries and
    its features) to the step's estimate (`online_device_bytes`: the larger of the two phases),
    and refuses in one line naming the flags to change.
The teacher's mesh sizes are chosen in one place, `teacher_axis_dims`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pipeline.dump.run import DumpConfig, build_manifest
from pipeline.dump.sources import default_sequences, teacher_info
from pipeline.errors import UserError
from pipeline.teacher import jax_setup, sharding
from train import aot, memory
from train.config import TrainConfig
from train.evaluate import Evaluator
from train.loader import to_global
from train.mesh import MESH_AXES, batch_sharding, parse_mesh
from train.tokens import TokenSequences

TOKEN_KEYS = ("input_ids", "loss_mask", "anchors", "anchor_valid")  # the loader's; no features


def dump_config(cfg: TrainConfig) -> DumpConfig:
    """The dump that would write the cache this online run trains on (its tokenization, layer
    choice and identity are reused, never re-implemented)."""
    return DumpConfig(model=cfg.teacher, data=cfg.data, seq_len=cfg.seq_len,
                      max_seqs=cfg.max_seqs, num_layers=cfg.teacher_layers,
                      dtype=cfg.teacher_dtype, block_size=cfg.block_size, format="tensorstore",
                      progress=cfg.progress)


def teacher_axis_dims(spec: str | None, devices, num_experts: int) -> tuple[int, ...]:
    """The teacher's EasyDeL mesh sizes (dp, fsdp, ep, tp, sp) over `devices`: --teacher-mesh, or
    the dump's default (pipeline/teacher/sharding.default_axis_dims: fsdp over every chip, experts
    sharded, on accelerators). The one place the online
    trainer chooses it."""
    platform = devices[0].platform
    dims = (jax_setup.parse_axis_dims(spec) if spec else
            sharding.default_axis_dims(len(devices), platform, num_experts))
    try:
        return jax_setup.check_axis_dims(dims, len(devices), platform)
    except UserError as e:
        raise UserError(str(e).replace("--sharding-axis-dims", "--teacher-mesh")) from None


def shared_mesh(spec: str | None, teacher_mesh: Mesh) -> Mesh:
    """The draft's (data, fsdp, tensor) mesh over the teacher mesh's devices, in its order: a
    program may then read arrays of both (jit needs one device order for all its shardings)."""
    devices = list(teacher_mesh.devices.flat)
    sizes = parse_mesh(spec, len(devices), jax.process_count())
    return Mesh(np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES)),
                MESH_AXES)


class TeacherFeatures:
    """ids [b, T] (a global array on the shared mesh) -> features [b, T, K*H] bfloat16, laid out
    as the draft step reads them (`feature_sharding`): one jitted program, nothing on the host.

    `fn(state, ids, mask)` is the teacher's pure forward (`Teacher.features_fn`), `state` its
    weights (arrays, or sharded ShapeDtypeStructs to only compile it: tools.tpu_compile)."""

    def __init__(self, fn, state, teacher_mesh: Mesh, feature_sharding):
        def run(state, ids):
            # every position is a real token (packed sequences), as in the dump
            return fn(state, ids, jnp.ones(ids.shape, bool)).astype(jnp.bfloat16)

        self._jit = jax.jit(run, out_shardings=feature_sharding)
        self._state, self.mesh = state, teacher_mesh

    def __call__(self, ids: jax.Array) -> jax.Array:
        with self.mesh:  # EasyDeL's sharding constraints name the teacher mesh's axes
            return self._jit(self._state, ids)

    def compile(self, ids_abstract: jax.ShapeDtypeStruct):
        """The compiled forward for ids of this shape; aot.DoesNotFit when it exceeds HBM."""
        with self.mesh:
            return aot.compile_lowered(self._jit.lower(self._state, ids_abstract))


class Lookahead:
    """The device batches of the loader's iterator, one ahead: returning batch n dispatches the
    teacher forward of batch n+1, which the devices run while (or right before) the step on
    batch n, so the step never waits for the host to start the next forward (including at the
    loop's log and save points, which wait for the step). get_state/set_state are the loader's
    position after the batch last returned (what a checkpoint stores), not after the one ahead."""

    def __init__(self, data_it, make):
        self._it, self._make = data_it, make
        self._ahead = None  # (device batch, loader state after it)
        self._state = data_it.get_state()

    def __iter__(self):
        return self

    def _prepare(self):
        batch = self._make(next(self._it))
        return batch, self._it.get_state()

    def __next__(self) -> dict:
        batch, self._state = self._ahead or self._prepare()
        self._ahead = self._prepare()
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)
        self._state, self._ahead = state, None


class OnlineEvaluator(Evaluator):
    """The held-out evaluation of train/evaluate.py with the held-out sequences' features
    computed by the teacher on the devices (instead of read from a cache)."""

    def __init__(self, features: TeacherFeatures, cfg, dcfg, mesh, *args):
        super().__init__(cfg, dcfg, mesh, *args)
        self._teacher, self._ids_sh = features, batch_sharding(mesh, 2)

    def _features(self, rows: np.ndarray) -> jax.Array:
        ids = np.zeros((len(rows), self.t), np.int32)  # padding rows: features never read
        for i, r in enumerate(rows):
            if r >= 0:
                ids[i] = self.reader.read_tokens(int(r))["input_ids"]
        return self._teacher(jax.make_array_from_process_local_data(self._ids_sh, ids))


@dataclasses.dataclass
class OnlineSource:
    """What `train.loop.train` takes from online data in place of a cache."""

    tokens: TokenSequences  # the "cache" of the loader and the held-out split (no features)
    teacher_path: Path
    hf_config: dict
    identity: dict  # run.json's "cache" section: a resume must find the same data and teacher
    mesh: Mesh  # the draft's mesh, shared with the teacher
    features: TeacherFeatures | None = None  # set by `attach`

    @property
    def manifest(self):
        return self.tokens.manifest

    def attach(self, features: TeacherFeatures) -> None:
        self.features = features

    def device_batch(self, host_batch: dict, batch_sh: dict) -> dict:
        """The loader's token batch on the devices, plus its features from the teacher (the
        forward is dispatched, not awaited)."""
        batch = to_global(host_batch, batch_sh, TOKEN_KEYS)
        batch["features"] = self.features(batch["input_ids"])
        return batch

    def batches(self, data_it, batch_sh: dict) -> "Lookahead":
        return Lookahead(data_it, lambda b: self.device_batch(b, batch_sh))

    def evaluator(self, cfg, dcfg, mesh, eval_cache, heldout, param_sh, frozen_sh):
        if cfg.eval_data:  # a held-out cache: its features are read, as in cache training
            return Evaluator(cfg, dcfg, mesh, eval_cache, heldout, param_sh, frozen_sh)
        return OnlineEvaluator(self.features, cfg, dcfg, mesh, eval_cache, heldout, param_sh,
                               frozen_sh)

    def estimate_memory(self, cfg: TrainConfig, prog, compiled_step, loader_estimate):
        """The step's estimate (`loader_estimate(compiled, batch_device_bytes, loader_bytes)`, the
        loop's) with the compiled teacher forward added per device, and the tokens and the token
        loader on the host; refuses in one line when it cannot fit."""
        ids = jax.ShapeDtypeStruct((cfg.batch_size, self.manifest.seq_len), jnp.int32,
                                   sharding=prog.batch_sh["input_ids"])
        try:
            t = _analysis(self.features.compile(ids))
        except aot.DoesNotFit as e:
            raise UserError(refusal(cfg, f"the teacher forward alone {e}")) from None
        d = _analysis(compiled_step, prog.batch_device_bytes())
        peak = online_device_bytes(d, t)
        teacher = peak - d["total"]  # what online adds to the cache trainer's step
        token_rec = self.manifest.seq_len * 5  # int32 id + uint8 mask
        pc = jax.process_count()
        loader = ((cfg.prefetch + cfg.read_threads) * token_rec
                  + 2 * (cfg.batch_size // pc) * token_rec + self.tokens.nbytes)
        est = loader_estimate(compiled_step, prog.batch_device_bytes() + teacher, loader)
        if not est.fits():
            if est.device_limit_bytes is not None and est.step_device_bytes > est.device_limit_bytes:
                what = (f"needs {est.step_device_bytes / 1e9:.2f} GB per device (teacher weights "
                        f"and forward {teacher / 1e9:.2f} GB of it), "
                        f"{est.device_limit_bytes / 1e9:.2f} GB free")
            else:
                what = (f"needs {est.host_bytes / 1e9:.2f} GB of host memory (teacher "
                        f"{teacher * est.local_devices / 1e9:.2f} GB, tokens "
                        f"{self.tokens.nbytes / 1e9:.2f} GB of it), "
                        f"{est.host_available_bytes / 1e9:.2f} GB available")
            raise UserError(refusal(cfg, f"it {what}"))
        return est, teacher


def online_device_bytes(draft: dict, teacher: dict) -> int:
    """Peak bytes per device of online training, from the two programs' memory analyses
    ({"arguments", "output", "total"}, `total` as train.memory counts a program; the draft's
    includes the next batch). The devices run the programs one after the other, so their
    temporaries never coexist, while each one's arguments stay resident through the other:
      teacher forward: its weights, temporaries and features + the draft step's arguments
                       (state, frozen tensors, the batch being trained on);
      draft step:      the step with the next batch + the teacher's weights and its features.
    The larger phase is the peak (their plain sum over-counts by the smaller temporaries)."""
    return max(teacher["total"] + draft["arguments"],
               draft["total"] + teacher["arguments"] + teacher["output"])


def _analysis(compiled, extra: int = 0) -> dict:
    m = compiled.memory_analysis()
    total = memory.compiled_device_bytes(compiled) + extra
    if m is None:  # no analysis on this backend: count every byte as live at once
        return {"arguments": total, "output": 0, "total": total}
    return {"arguments": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "total": total}


def refusal(cfg: TrainConfig, what: str) -> str:
    """The one line refusing an online run that cannot fit, naming the flags that change it."""
    remat = "" if cfg.remat else ", --remat"
    mesh = f"--teacher-mesh (now {cfg.teacher_mesh or 'default'}: shard the teacher over more " \
           "devices)"
    dtype = ", --teacher-dtype bfloat16" if cfg.teacher_dtype != "bfloat16" else ""
    return (f"online training will not fit in memory: {what}; shrink it with --batch-size (now "
            f"{cfg.batch_size}), --seq-len (now {cfg.seq_len}), {mesh}{dtype}, --anchors-per-seq "
            f"(now {cfg.anchors_per_seq}){remat}, --max-seqs (tokens held on the host), or raise "
            "--memory-limit-gb if more is free")


def _content(tokens: TokenSequences, data_identity: dict) -> str:
    """The run's data identity: the data files' fingerprint and the tokens themselves."""
    import xxhash

    h = xxhash.xxh3_128(json.dumps(data_identity, sort_keys=True).encode())
    h.update(np.ascontiguousarray(tokens.ids).data)
    h.update(np.ascontiguousarray(tokens.mask).data)
    return h.hexdigest()


def open_online(cfg: TrainConfig, devices=None) -> OnlineSource:
    """Tokenize --data, load the teacher (EasyDeL: imported here only) on every device, and lay
    the draft's mesh over the same devices. UserError lines for bad input, before the load."""
    if devices is not None and len(devices) != jax.device_count():
        raise UserError("online training runs the teacher on every device; do not restrict "
                        "the devices")
    dump = dump_config(cfg)
    dump.validate()
    info = teacher_info(dump)  # config.json only: bad --teacher or --seq-len stop here
    manifest = build_manifest(dump, info)
    tokens = TokenSequences.build(default_sequences(dump, info), manifest, limit=cfg.max_seqs,
                                  progress=cfg.progress)
    manifest = dataclasses.replace(manifest, num_records=len(tokens), complete=True)
    tokens.manifest = manifest
    hf_config = json.loads((Path(info.model_path) / "config.json").read_text())
    identity = {"teacher": manifest.teacher, "layer_ids": list(manifest.layer_ids),
                "hidden_size": manifest.hidden_size, "dtype": "bfloat16",
                "seq_len": manifest.seq_len, "num_records": len(tokens), "online": True,
                "content": _content(tokens, info.data_identity)}
    dims = teacher_axis_dims(cfg.teacher_mesh, jax.devices(),
                             int(hf_config.get("num_local_experts", 1)))
    if cfg.batch_size % dims[0]:
        raise UserError(f"--batch-size {cfg.batch_size} is not a multiple of the teacher mesh's "
                        f"dp={dims[0]} (--teacher-mesh)")
    from pipeline.teacher.easydel_teacher import Teacher  # easydel: the online path only

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[cfg.teacher_dtype]
    teacher = Teacher.from_pretrained(str(info.model_path), dtype=dtype, sharding_axis_dims=dims)
    mesh = shared_mesh(cfg.mesh, teacher.mesh)
    fn, state = teacher.features_fn(manifest.layer_ids)
    src = OnlineSource(tokens=tokens, teacher_path=Path(info.model_path), hf_config=hf_config,
                       identity=identity, mesh=mesh)
    src.attach(TeacherFeatures(fn, state, teacher.mesh, batch_sharding(mesh, 3)))
    return src
