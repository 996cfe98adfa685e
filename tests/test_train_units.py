"""Small pieces of the trainer: --mesh parsing, logical-axis sharding, the LR schedule, reading
only the embedding and LM head of a teacher snapshot, expected tau."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from model.config import DraftConfig
from pipeline.errors import UserError
from tests._train_fixtures import write_teacher_stub
from train import step as step_lib
from train.config import TrainConfig
from train.mesh import make_mesh, parse_mesh, spec_for
from train.metrics import expected_tau
from train.teacher_weights import load_embedding_and_head


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh(None, 8, n_processes=2) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh("tensor=2,fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad in ("data=3", "pipe=2", "data=x", "data=0", "data=-1,fsdp=-1", "data"):
        with pytest.raises(UserError):
            parse_mesh(bad, 8)


def test_logical_rules_and_state_shardings():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert spec_for(("embed", "heads"), (32, 64), mesh) == P("fsdp", "tensor")
    assert spec_for(("embed", "kv"), (31, 3), mesh) == P(None, None)  # does not divide: replicate
    assert spec_for(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    dcfg = DraftConfig.tiny(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, intermediate_size=64, num_hidden_layers=1, vocab_size=64,
                            mask_token_id=63, target_layer_ids=(1, 2), attention_bias=True)
    cfg = TrainConfig.tiny()
    abstract = jax.eval_shape(lambda k: step_lib.init_state(cfg, dcfg, k), jax.random.PRNGKey(0))
    sh = step_lib.state_shardings(cfg, dcfg, mesh, abstract)
    q = sh["params"]["layers"][0]["self_attn"]["q_proj"]
    assert q["kernel"].spec == P("fsdp", "tensor") and q["bias"].spec == P("tensor")
    assert sh["params"]["layers"][0]["mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
    # AdamW moments follow their param; the step counter is replicated.
    flat = jax.tree_util.tree_flatten_with_path(sh["opt_state"])[0]
    q_moments = [s for path, s in flat if "q_proj" in jax.tree_util.keystr(path)
                 and "kernel" in jax.tree_util.keystr(path)]
    assert len(q_moments) == 2 and all(s.spec == P("fsdp", "tensor") for s in q_moments)
    assert all(s.spec == P() for path, s in flat if "count" in jax.tree_util.keystr(path))


def test_lr_schedule_warmup_cosine():
    cfg = TrainConfig(steps=1000, lr=6e-4, warmup_frac=0.04)
    lr = step_lib.lr_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(20)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(40)), 6e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(520)), 3e-4, rtol=1e-5)  # cosine midpoint
    assert float(lr(1000)) == pytest.approx(0.0, abs=1e-12)


def test_read_only_embedding_and_head(tmp_path):
    snap = write_teacher_stub(tmp_path / "t", hidden=16, vocab=40)
    embed, head = load_embedding_and_head(snap)
    wmap = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(snap / wmap["lm_head.weight"]), "numpy") as f:
        np.testing.assert_array_equal(head, f.get_tensor("lm_head.weight"))
    with safe_open(str(snap / wmap["model.embed_tokens.weight"]), "numpy") as f:
        np.testing.assert_array_equal(embed, f.get_tensor("model.embed_tokens.weight"))
    assert embed.shape == (40, 16) and not np.array_equal(embed, head)
    cfg = json.loads((snap / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    embed2, head2 = load_embedding_and_head(snap)
    assert head2 is embed2
    with pytest.raises(UserError, match="not found"):
        load_embedding_and_head(tmp_path / "missing")


def test_expected_tau():
    assert expected_tau([0, 0, 0]) == 1.0
    assert expected_tau([1, 1, 1]) == 4.0
    np.testing.assert_allclose(expected_tau([0.5, 0.5, 1.0]), 1 + 0.5 + 0.25 + 0.25)


def test_trainer_imports_no_easydel_or_torch():
    """The lent GPU machine has JAX but cannot import EasyDeL: train/ must not pull it (or torch)."""
    import subprocess
    import sys
    code = ("import sys, train.main, train.loop; "
            "bad = [m for m in ('easydel', 'torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
