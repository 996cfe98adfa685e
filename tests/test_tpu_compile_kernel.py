"""The block-sparse Pallas TPU attention kernel (model.kernels.block_sparse_tpu) compiled through
Mosaic for a real TPU topology (v5e:2x2, libtpu in .venv-tpu), forward and backward, beside its
interpret-mode numerics in tests/test_attention_kernels.py (issue 16 item 3)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_PY = ROOT / ".venv-tpu" / "bin" / "python"

_SCRIPT = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from train.aot import topology_devices
from model.kernels.block_sparse_tpu import block_sparse_tpu

dev = topology_devices("v5e:2x2")[0]
sh = SingleDeviceSharding(dev)
b, n, bs, hq, hk, d, t = 2, 64, 8, 8, 2, 64, 1024
S = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
args = (S((b, n, bs, hq, d)), S((b, t, hk, d)), S((b, t, hk, d)), S((b, n, bs, hk, d)),
        S((b, n, bs, hk, d)), S((b, n), jnp.int32))

def fwd(q, kc, vc, kb, vb, a):
    return block_sparse_tpu(q, kc, vc, kb, vb, a, causal=False, window=None, scale=d ** -0.5)

def loss(q, kc, vc, kb, vb, a):
    return fwd(q, kc, vc, kb, vb, a).astype(jnp.float32).sum()

out = {}
for name, f in (("forward", fwd), ("backward", jax.grad(loss, argnums=(0, 1, 2, 3, 4)))):
    lowered = jax.jit(f).lower(*args)
    text = lowered.as_text()
    compiled = lowered.compile()
    out[name] = {"mosaic": "tpu_custom_call" in text,
                 "code": int(compiled.memory_analysis().generated_code_size_in_bytes)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_pallas_tpu_kernel_compiles_for_v5e_forward_and_backward():
    assert TPU_PY.exists(), ".venv-tpu is missing: `make tpu-venv` (make test builds it)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("JAX_PLATFORMS", None)
    r = subprocess.run([str(TPU_PY), "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stderr[-4000:]
    out = json.loads(line[len("RESULT "):])
    # The lowered program carries the Mosaic kernel (not an XLA fallback), both ways.
    assert out["forward"]["mosaic"] and out["backward"]["mosaic"]
    assert out["forward"]["code"] > 0 and out["backward"]["code"] > 0  # a TPU executable
