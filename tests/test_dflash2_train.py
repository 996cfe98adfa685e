"""`train.main --arch dflash2` end to end on CPU (8 simulated devices, the tiny random cache of
tests/_train_fixtures.py): the run logs the selector's figures and the held-out simulated tau,
exports a DFlash2 draft, and a kill -9 plus rerun reproduce the uninterrupted run bit for bit
(losses and params). Step 0 of a DFlash2 run is the DFlash run's draft (identity convolutions)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from tests._train_fixtures import small_run_data

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE = 12, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("dflash2_train"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cmd(data, out):
    return [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out),
            "--arch", "dflash2", "--steps", str(STEPS), "--save-every", str(SAVE),
            "--batch-size", "8", "--block-size", "4", "--draft-layers", "1",
            "--anchors-per-seq", "8", "--compute-dtype", "float32", "--vocab-chunk", "48",
            "--token-chunk", "64", "--log-every", "1", "--read-threads", "1", "--prefetch", "4",
            "--no-progress", "--eval-fraction", "0.1", "--eval-every", "6",
            "--mesh", "data=2,fsdp=2,tensor=2"]


def _rows(out: Path) -> dict:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return rows


@pytest.fixture(scope="module")
def reference(data, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(_cmd(data, out), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_dflash2_run_logs_selector_and_exports(reference):
    out, summary = reference
    rows = _rows(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    last = rows[STEPS]
    for key in ("cand_recall", "selector_acc", "selector_loss", "unary_loss", "sel_acc_slot1",
                "eval_sim_tau", "eval_acc_slot1"):
        assert key in last, key
    assert 0.0 < last["cand_recall"] <= 1.0 and last["selector_loss"] > 0
    assert last["loss"] == pytest.approx(last["unary_loss"] + last["selector_loss"], rel=1e-6)
    assert summary["eval"]["sim_tau"] >= 1.0
    config, params = model.load_draft(out / "export")
    assert config.dflash2 is not None and config.to_hf_dict()["architectures"] == [
        "DFlash2DraftModel"]
    snap = model.load_msgpack(out / "draft_params.msgpack")[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(snap)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the additions trained: the convolutions left the identity, the codebooks moved
    conv = np.asarray(params["layers"][0]["attention_conv"]["kernel_projection"]["kernel"])
    assert np.abs(conv).max() > 0


@pytest.mark.slow
def test_dflash2_exact_resume_after_kill9(data, reference, env, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(data, out), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    first = out / "checkpoints" / str(SAVE)
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(_cmd(data, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert any(x.startswith("resumed from step") for x in rerun.stderr.splitlines())
    ref, got = _rows(ref_out), _rows(out)
    assert [got[s]["loss"] for s in sorted(got)] == [ref[s]["loss"] for s in sorted(ref)]
    a = jax.tree.leaves(model.load_msgpack(out / "draft_params.msgpack")[1])
    b = jax.tree.leaves(model.load_msgpack(ref_out / "draft_params.msgpack")[1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_step_zero_is_dflash():
    """Same seed: the DFlash2 draft's backbone is the DFlash draft, its convolutions are the
    identity, so the two drafts' hidden states are equal (training and inference forms)."""
    import dataclasses

    from tests._dflash2_fixtures import tiny_dflash2
    c2 = tiny_dflash2()
    c1 = dataclasses.replace(c2, dflash2=None)
    p2 = model.init_draft_params(c2, jax.random.key(7))
    p1 = model.init_draft_params(c1, jax.random.key(7))
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(1, 30, c1.num_features * c1.hidden_size)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(1, 3, c1.block_size, c1.hidden_size)), jnp.float32)
    anchors = jnp.asarray([[2, 11, 20]], jnp.int32)
    h2 = model.draft_hidden_train(c2, p2, feats, emb, anchors)
    h1 = model.draft_hidden_train(c1, p1, feats, emb, anchors)
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(h1))
    base = np.asarray(p2["layers"][0]["mlp_conv"]["base_kernel"])
    assert (base[:, 0] == 1).all() and (base[:, 1:] == 0).all()


def test_param_counts_of_gpt_oss_20b_drafts():
    """What the pre-flight line reports for the default gpt-oss-20b draft: the codebooks are
    2 x 201,088 x 256 (+ the 2880 x 256 hidden projection); each of the 16 convolutions has
    2 x 2 x 2880 taps and a 2880 x (2 x 2 x 180 groups) projection."""
    import dataclasses

    from model.config import DFlash2Config, DraftConfig
    from tools._tpu_report import teacher_hf_config

    hf = teacher_hf_config("gpt-oss-20b")
    d = DraftConfig.from_target(hf, num_draft_layers=8, block_size=8, mask_token_id=200000)
    one, two = model.param_counts(d), model.param_counts(dataclasses.replace(
        d, dflash2=DFlash2Config()))
    assert one["backbone"] == two["backbone"] == one["total"]
    assert two["selector"] == 2 * 201_088 * 256 + 2880 * 256
    assert two["convolutions"] == 16 * (2 * 2 * 2880 + 2880 * 2 * 2 * 180)
