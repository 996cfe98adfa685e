"""TPU programs compiled ahead of time for a real topology (v5e:2x2) on this CPU machine, through
libtpu in .venv-tpu (`make test` builds it; the main .venv has no libtpu on purpose, so the
compiles run in a subprocess there): the trainer's draft step, the teacher forward, memory
reports checked against the input shapes, an oversized batch reported as not fitting, and the
trainer's pre-flight check refusing it in one line from the same memory analysis (issue 16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_PY = ROOT / ".venv-tpu" / "bin" / "python"
GiB = 1 << 30

_TINY = ("--topology v5e:2x2 --teacher tiny --seq-len 256 --anchors-per-seq 16 --block-size 4 "
         "--draft-layers 1")

# Runs in .venv-tpu: every compile in one process (libtpu and EasyDeL import once).
_SCRIPT = r"""
import argparse, json, sys
import numpy as np
from tools import _tpu_report as rep
from tools.tpu_compile import build_parser
from train import aot, memory
from pipeline.errors import UserError

def opts(extra):
    return build_parser().parse_args((TINY + " " + extra).split())

out = {}
small = rep.draft_report(opts("--batch-size 8"))
out["small"] = small
# The input bytes per chip, computed here from the trainer's own abstract inputs.
from model.config import DraftConfig
from train.config import TrainConfig
from train.mesh import make_mesh
hf = rep.teacher_hf_config("tiny")
dcfg = DraftConfig.from_target(hf, num_draft_layers=1, block_size=4,
                               mask_token_id=hf["vocab_size"] - 1, num_features=5)
devs = aot.topology_devices("v5e:2x2")
cfg = TrainConfig(batch_size=8, block_size=4, draft_layers=1, anchors_per_seq=16)
prog = aot.step_program(cfg, dcfg, make_mesh(None, devs), seq_len=256,
                        feature_dim=5 * dcfg.hidden_size, num_anchors=16)
def shard_bytes(tree):
    import jax
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))
out["input_shard_bytes"] = shard_bytes((prog.state, prog.frozen, prog.batch))
out["state_shard_bytes"] = shard_bytes(prog.state)

# Oversized: 4096 sequences of 8192 tokens; the features alone are 10 GiB per chip.
big = rep.draft_report(opts("--batch-size 4096 --seq-len 8192 --anchors-per-seq 16"))
out["big"] = big
# The trainer's pre-flight check (train.memory, as train.loop calls it) on the same program.
cfg_big = TrainConfig(batch_size=4096, block_size=4, draft_layers=1, anchors_per_seq=16)
prog_big = aot.step_program(cfg_big, dcfg, make_mesh(None, devs), seq_len=8192,
                            feature_dim=5 * dcfg.hidden_size, num_anchors=16)
try:  # the trainer's compile (train.loop): XLA:TPU refuses a program past HBM
    compiled = aot.compile_or_refuse(prog_big, cfg_big)
    est = memory.estimate_memory(compiled, batch_device_bytes=prog_big.batch_device_bytes(),
                                 local_devices=devs, loader_bytes=0, state_bytes=0,
                                 params_bytes=0)
    out["estimate"] = est.to_dict()
    memory.check_fits(est, cfg_big)
    out["refusal"] = None
except UserError as e:
    out["refusal"] = str(e)
out["hbm_free"] = memory.device_free_bytes(devs)

out["teacher"] = rep.teacher_report(build_parser().parse_args(
    "--program teacher --topology v5e:2x2 --teacher tiny --batch-size 4 --seq-len 256".split()))
print("RESULT " + json.dumps(out))
""".replace("TINY", repr(_TINY))


def _tpu_env() -> dict:
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # libtpu's topology needs the TPU plugin registered
    env["PYTHONPATH"] = str(ROOT)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # other compiles may hold libtpu's lockfile
    return env


@pytest.fixture(scope="module")
def compiled():
    assert TPU_PY.exists(), ".venv-tpu is missing: `make tpu-venv` (make test builds it)"
    r = subprocess.run([str(TPU_PY), "-c", _SCRIPT], cwd=ROOT, env=_tpu_env(),
                       capture_output=True, text=True, timeout=1500)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-4000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_tiny_draft_step_compiles_for_v5e_and_fits(compiled):
    row = compiled["small"]
    m = row["memory"]
    assert row["chips"] == 4 and row["chip"] == "v5e" and row["mesh"]["fsdp"] == 4
    assert m["hbm"] == 16 * GiB
    # XLA holds at least every input's shard (TPU tiles may pad), not wildly more.
    assert compiled["input_shard_bytes"] <= m["arguments"] <= 4 * compiled["input_shard_bytes"]
    # The state is donated: the updated state aliases it.
    assert m["alias"] >= compiled["state_shard_bytes"]
    assert m["total"] == (m["arguments"] + m["output"] - m["alias"] + m["temp"] + m["code"]
                          + m["next_batch"])
    assert m["fits"] is True and m["margin"] == m["hbm"] - m["total"] > 0
    assert row["xla_flops"] > 0 and row["model_flops"] > 0
    assert row["step_s_estimate_at_peak"] == pytest.approx(row["model_flops"] / (4 * 197e12))


@pytest.mark.slow
def test_oversized_batch_reported_as_not_fitting(compiled):
    m = compiled["big"]["memory"]
    # 4096 x 8192 x 640 bf16 features over 4 chips are 10 GiB per chip, twice (this batch and
    # the next): XLA:TPU either reports a total past HBM or refuses to compile it.
    assert m["fits"] is False
    if m.get("compile_error"):
        assert "memory" in m["compile_error"].lower()
    else:
        assert m["total"] > 16 * GiB and m["margin"] < 0


@pytest.mark.slow
def test_trainer_preflight_refuses_it_in_one_line(compiled):
    assert compiled["hbm_free"] == 16 * GiB  # topology devices have no stats: the chip's HBM
    msg = compiled["refusal"]
    assert msg and "\n" not in msg and "will not fit" in msg and "--batch-size (now 4096)" in msg


@pytest.mark.slow
def test_tiny_teacher_forward_compiles_for_v5e(compiled):
    row = compiled["teacher"]
    m = row["memory"]
    # the dump's defaults: fsdp over the 4 chips (4 experts divide), blocksparse attention at
    # T padded to its 512 block (EasyDeL would otherwise run vanilla)
    assert row["mesh"] == {"dp": 1, "fsdp": 4, "ep": 1, "tp": 1, "sp": 1}
    assert row["attention"] == "blocksparse" and row["run_seq_len"] == 512
    assert row["roofline_tokens_per_s"] > 0 and row["roofline_bound"] in ("compute", "memory")
    from dflash.model import build_target_layer_ids  # the reference's rule, as the dump uses it

    assert row["layer_ids"] == build_target_layer_ids(8, 5) == [1, 2, 3, 4, 5]
    # tiny: 4096 x 128 embedding + head bf16 alone are 2 MiB; features out [4, 256, 640] bf16.
    assert m["output"] >= 4 * 256 * 640 * 2 // 4
    assert 0 < m["arguments"] and m["temp"] > 0 and m["fits"] is True


def test_without_libtpu_one_line_error():
    """The main .venv has no libtpu: the tool says how to get it, in one line, exit 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tools.tpu_compile", "--topology", "v5e:2x2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "make tpu-venv" in err[0] and "Traceback" not in r.stderr


# Two messages XLA:TPU gave for the gpt-oss-20b teacher forward over v5e:2x4 with the seed's
# 1,8,1,1,1 mesh and for an oversized tiny-teacher batch (abridged to the lines parsed).
_OOM_TOTAL = """RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 37.25G of 15.75G hbm. Exceeded hbm capacity by 21.50G.
Total hbm usage >= 37.50G:
    reserved        258.00M 
    program           3.58G 
    arguments        33.67G 
Output size 84.38M; shares 0B with arguments.
"""
_OOM_ONE = ("RESOURCE_EXHAUSTED: Allocation (size=17314086912) would exceed memory "
            "(size=17179869184) :: #allocation314 [shape = 'f32[1024,2,2,1024,1025]']")


def test_compiler_oom_messages_become_a_memory_row():
    """Both forms of XLA:TPU's refusal are parsed into used / available and, where the compiler
    gives it, its split (arguments = weights per chip, program = temp): the report says which
    one to shrink instead of printing a traceback."""
    from tools._tpu_report import oom_row
    from train.aot import _oom

    e = _oom(_OOM_TOTAL)
    assert (e.used, e.available) == (int(37.25 * GiB), int(15.75 * GiB))
    assert e.parts == {"reserved": int(258.0 * (1 << 20)), "program": int(3.58 * GiB),
                       "arguments": int(33.67 * GiB)}
    row = oom_row(e, 16 * GiB)
    assert row["fits"] is False and row["arguments"] == int(33.67 * GiB)
    assert row["margin"] == int(15.75 * GiB) - int(37.25 * GiB)
    one = _oom(_OOM_ONE)
    assert (one.used, one.available, one.parts) == (17314086912, 17179869184, {})
    assert _oom("INVALID_ARGUMENT: something else") is None
