"""The cached decoder at scale, on CPU: MXFP4 snapshots (a tiny one written here in the published
gpt-oss layout) against transformers' dequantization and HF torch's forward; the sharded decoder
(8 simulated devices, mesh data x model) against the one-device one; bf16 weights."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.speculative import mxfp4
from pipeline.speculative import target as tc
from pipeline.speculative import weights
from pipeline.speculative.generate import BatchGenerator, SamplingConfig
from tests._spec_fixtures import make_target, random_prompts

NEW = 12


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("scale-target"), seed=4)


@pytest.fixture(scope="module")
def mxfp4_dir(target_dir, tmp_path_factory):
    """target_dir with its experts stored as MXFP4 blocks/scales (config: quantization_config
    mxfp4, as the published checkpoints): what HF and our loader both read."""
    from safetensors.numpy import save_file

    from model.safetensors_io import read_safetensors

    out = tmp_path_factory.mktemp("scale-mxfp4")
    tensors = {}
    for name, value in read_safetensors(target_dir).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4.quantize(value)
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _hf(path, **kw):
    import torch
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def test_mxfp4_dequantize_equals_transformers(mxfp4_dir):
    import torch
    from safetensors.numpy import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(str(mxfp4_dir / "model.safetensors"))
    blocks = [k for k in stored if k.endswith("_blocks")]
    assert len(blocks) == 8  # 4 layers x (gate_up, down)
    for k in blocks:
        scales = stored[k.replace("_blocks", "_scales")]
        ref = convert_moe_packed_tensors(torch.from_numpy(stored[k]), torch.from_numpy(scales))
        ours = mxfp4.dequantize(stored[k], scales)
        assert np.array_equal(ours, ref.float().numpy()), k  # bitwise: exact in bf16 and f32
        assert np.array_equal(ours, ours.astype(jnp.bfloat16).astype(np.float32))


def test_mxfp4_snapshot_logits_equal_hf_torch(mxfp4_dir, target_dir):
    """Our loader on the MXFP4 snapshot vs HF torch loading it (Mxfp4Config(dequantize=True)),
    float32 forward, a sequence longer than the sliding window. HF keeps the dequantized experts
    in bf16 (and multiplies in bf16); they are exact in bf16, so `.float()` gives the same
    weights in float32, and both forwards then run in float32."""
    import torch
    from transformers import Mxfp4Config

    hf = _hf(mxfp4_dir, quantization_config=Mxfp4Config(dequantize=True))
    assert hf.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    hf = hf.float()
    ids = random_prompts(1, (26, 27), seed=9)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    target = tc.CachedTarget(mxfp4_dir, [1], dtype="float32")
    target.reset(32)
    got, _ = target.run(np.asarray(ids, np.int32), 0, len(ids), 32)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # and the quantization changed the function (the snapshot is not the dense one in disguise)
    with torch.no_grad():
        dense = _hf(target_dir)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(dense - ref).max() > 1e-2 * np.abs(ref).max()


def test_sharded_equals_one_device(target_dir):
    """Mesh data=4 x model=2 over 8 CPU devices (KV heads, expert width and vocab split over model,
    rows over data) vs one device: the same greedy tokens and the same hidden states."""
    devices = jax.devices()
    assert len(devices) == 8
    prompts = random_prompts(8, (3, 21), seed=2)
    sampling = SamplingConfig(max_new_tokens=NEW)
    one = BatchGenerator.from_snapshot(target_dir, stop_ids=(), sampling=sampling, batch_size=8,
                                       dtype="float32", devices=devices[:1])
    many = BatchGenerator.from_snapshot(target_dir, stop_ids=(), sampling=sampling, batch_size=8,
                                        dtype="float32", devices=devices, model_shards=2)
    assert dict(many.shape.mesh.shape) == {"data": 4, "model": 2}
    q = many.params["layers"][0]["gate_up"]
    assert q.sharding.shard_shape(q.shape)[-1] == q.shape[-1] // 2
    rows = list(range(len(prompts)))
    assert many.generate(prompts, rows) == one.generate(prompts, rows)

    tokens = jnp.asarray(np.stack([np.asarray(p[:3]) for p in prompts]), jnp.int32)
    first = jnp.zeros((8,), jnp.int32)
    outs = []
    for g in (one, many):
        hidden, feats, _ = jax.jit(lambda p, c: tc.forward_rows(g.shape, p, c, tokens, 0, first,
                                                                with_features=True))(
            g.params, tc.new_row_cache(g.shape, 8, 64))
        outs.append((np.asarray(hidden), np.asarray(feats)))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_and_cache(target_dir):
    """bf16: weights and cache stored in bf16 (half the bytes), logits within bf16 rounding of the
    float32 decoder's, the greedy first token the same where float32's top-2 margin is clear."""
    f32 = tc.CachedTarget(target_dir, [0], dtype="float32")
    b16 = tc.CachedTarget(target_dir, [0], dtype="bfloat16")
    assert b16.params["layers"][0]["gate_up"].dtype == jnp.bfloat16
    assert b16.params["layers"][0]["router"].dtype == jnp.float32  # routing stays float32
    ids = np.asarray(random_prompts(1, (20, 21), seed=6)[0], np.int32)
    out = []
    for t in (f32, b16):
        t.reset(32)
        out.append(t.run(ids, 0, len(ids), 32)[0])
        assert t.cache[0][0].dtype == t.shape.jnp_dtype
    ref, got = out
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    top2 = np.sort(ref, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.1 * np.abs(ref).max()
    assert clear.sum() >= 5
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_roofline_counts_the_decode_step():
    """The roofline's bytes: at batch 64 every expert is hit, weights per chip = params but the
    embedding table / 8 (bf16), KV = the full cache on full layers and the window on sliding
    ones."""
    from tools._tpu_regenerate import HBM_BANDWIDTH, roofline
    from tools._tpu_report import teacher_hf_config
    from train.aot import CHIPS

    hf = teacher_hf_config("gpt-oss-20b")
    mesh = weights.decoder_mesh(jax.devices(), hf)
    assert dict(mesh.shape) == {"data": 1, "model": 8}
    s = weights.shape_from_config(hf, dtype="bfloat16", mesh=mesh)
    total = weights.param_bytes(s)
    assert 40e9 < total < 43e9  # 20.9B parameters, bf16 (router, norms, biases float32)
    r = roofline(s, CHIPS["TPU v5 lite"], batch=64, cache_len=4096)
    assert r["experts_hit_fraction"] > 0.999
    embed = 201_088 * 2880 * 2  # only 64 of its rows are read
    assert abs(r["weight_bytes_per_chip"] - (total - embed) / 8) < 1e-3 * total
    kv = 64 * 2 * 8 * 64 * 2 * (12 * 4096 + 12 * 128) / 8
    assert r["kv_bytes_per_chip"] == int(kv)
    assert r["step_s"] == pytest.approx((r["weight_bytes_per_chip"] + kv) / HBM_BANDWIDTH["v5e"])
