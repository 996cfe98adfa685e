"""z-lab import/export against the reference loader, msgpack round trips, the export CLI, init."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dflash.model import DFlashDraftModel

import model
from pipeline.errors import UserError
from tests._model_fixtures import (GPT_OSS_YARN, reference_config, reference_forward,
                                   reference_model)
from tools import export_draft


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference draft with every optional feature on, saved by transformers 5 save_pretrained."""
    hf = reference_config(num_features=5, block_size=16, bias=True, rope_theta=150000.0,
                          rope_scaling=GPT_OSS_YARN, layers=3, sliding_window=5,
                          layer_types=("full_attention", "sliding_attention", "full_attention"),
                          extra_dflash={"output_multiplier": 0.7, "input_embedding_scale": 2.0})
    ref = reference_model(hf, seed=11)
    path = tmp_path_factory.mktemp("ref")
    ref.save_pretrained(path)
    return ref, path


def test_reference_save_our_load_save_reference_load_is_identical(reference, tmp_path):
    ref, path = reference
    config, params = model.load_draft(path)
    assert config.logits_scaling == 0.7 and config.input_embedding_scale == 2.0
    assert config.sliding_window == 5 and config.layer_types[1] == "sliding_attention"
    model.save_draft(tmp_path, config, params)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["DFlashDraftModel"] and saved["num_target_layers"] == 12
    back = DFlashDraftModel.from_pretrained(tmp_path).eval()
    want, got = ref.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    for key in ("rope_parameters", "layer_types", "sliding_window", "dflash_config",
                "attention_bias", "num_target_layers", "head_dim", "rms_norm_eps"):
        assert getattr(back.config, key) == getattr(ref.config, key), key
    # and the reloaded reference computes what the original does
    rng = np.random.default_rng(0)
    args = (rng.normal(size=(1, 9, 5 * 64)).astype(np.float32),
            rng.normal(size=(1, 16, 64)).astype(np.float32), np.arange(25)[None])
    np.testing.assert_array_equal(reference_forward(back, *args), reference_forward(ref, *args))


def test_msgpack_round_trip_and_bare_params(reference, tmp_path):
    _, path = reference
    config, params = model.load_draft(path)
    model.save_msgpack(tmp_path / "draft.msgpack", config, params)
    config2, params2 = model.load_msgpack(tmp_path / "draft.msgpack")
    assert config2 == config
    _tree_equal(params, params2)

    # A bare params tree (the seed's draft_params.msgpack), optionally under "params".
    from flax import serialization
    for state in (params, {"params": params}):
        raw = tmp_path / "bare.msgpack"
        raw.write_bytes(serialization.to_bytes(state))
        with pytest.raises(UserError, match="needs a config"):
            model.load_msgpack(raw)
        _tree_equal(params, model.load_msgpack(raw, config)[1])
    other = model.DraftConfig.tiny()
    with pytest.raises(UserError):
        model.load_msgpack(raw, other)


def test_export_cli_msgpack_to_zlab_loads_in_reference(reference, tmp_path, capsys):
    ref, path = reference
    config, params = model.load_draft(path)
    model.save_msgpack(tmp_path / "d.msgpack", config, params)
    assert export_draft.main([str(tmp_path / "d.msgpack"), str(tmp_path / "out"),
                              "--dtype", "bfloat16"]) == 0
    back = DFlashDraftModel.from_pretrained(tmp_path / "out").eval()
    for name, want in ref.state_dict().items():
        got = back.state_dict()[name]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want.to(torch.bfloat16)), name

    capsys.readouterr()  # drop transformers' progress bars
    assert export_draft.main([str(tmp_path / "missing.msgpack"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such file" in err


def test_load_rejects_weights_that_do_not_fit_the_config(reference, tmp_path):
    _, path = reference
    config, params = model.load_draft(path)
    state = model.io.to_hf_state_dict(config, params)
    from safetensors.numpy import save_file
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(dict(state, **{"layers.0.extra.weight": np.zeros(3, np.float32)}),
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="unexpected"):
        model.load_draft(tmp_path)
    state["fc.weight"] = state["fc.weight"][:, :-1]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="fc.weight"):
        model.load_draft(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        model.load_draft(tmp_path / "nowhere")


def test_init_params_like_reference_and_logical_axes(tmp_path):
    config = model.DraftConfig.tiny(attention_bias=True, hidden_size=128, intermediate_size=256)
    params = model.init_draft_params(config, jax.random.key(0))
    axes = model.param_logical_axes(config)
    flat_p, tree_p = jax.tree.flatten(params)
    assert tree_p == jax.tree.structure(axes)  # PartitionSpec leaves pair up with params
    for (path, x), ax in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(axes)):
        assert len(ax) == x.ndim and set(ax) <= {"embed", "heads", "kv", "mlp", None}
        name = path[-1].key
        if name == "kernel":
            assert abs(float(np.std(np.asarray(x))) - 0.02) < 0.002, path
        else:
            assert np.all(np.asarray(x) == (0.0 if name == "bias" else 1.0)), path
    assert axes["layers"][1]["self_attn"]["q_proj"]["kernel"] == ("embed", "heads")
    # The names shard the params on a (fsdp=2, tensor=4) mesh of the 8 simulated devices.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "heads": "tensor", "kv": "tensor", "mlp": "tensor"}
    shardings = jax.tree.map(
        lambda ax: NamedSharding(mesh, PartitionSpec(*(rules.get(a) for a in ax))), axes)
    sharded = jax.device_put(params, shardings)
    q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (64, 16)  # [128, 64] over fsdp=2 x tensor=4
    assert len(params["layers"]) == config.num_hidden_layers
    assert params["fc"]["kernel"].shape == (3 * 128, 128)
    assert len(flat_p) == 3 + config.num_hidden_layers * 15  # 11 weights + 4 biases per layer
    ids = model.block_tokens(config, jnp.arange(20)[None] % 7, jnp.array([[0, 5]]))
    assert ids.tolist() == [[[0] + [255] * 7, [5] + [255] * 7]]

    # A draft made here (never seen by the reference) saves to a checkpoint that the reference
    # loads and computes the same hidden states with.
    model.save_draft(tmp_path, config, params)
    ref = DFlashDraftModel.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(5)
    args = (rng.normal(size=(1, 6, 3 * 128)).astype(np.float32),
            rng.normal(size=(1, 8, 128)).astype(np.float32), np.arange(14)[None])
    got = jax.jit(model.draft_hidden, static_argnums=0)(config, params, *map(jnp.asarray, args))
    assert np.abs(np.asarray(got) - reference_forward(ref, *args)).max() <= 1e-4
