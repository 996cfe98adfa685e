"""The trainer end to end on CPU (tiny draft, random cache in the real format):
sharded (8 simulated devices, data=2,fsdp=2,tensor=2) == unsharded (1 device); kill -9 of the CLI
and a rerun reproduce the uninterrupted run bit for bit; reruns with other settings are refused."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import model
from pipeline.errors import UserError
from tests._train_fixtures import small_run_data
from train.config import TrainConfig
from train.loop import train

N_STEPS, SAVE_EVERY = 24, 4
MESH = "data=2,fsdp=2,tensor=2"
ROOT = Path(__file__).resolve().parents[1]


def _cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig.tiny(data=str(data), out=str(out), steps=N_STEPS, save_every=SAVE_EVERY,
                            **kw)


def _cli_args(cfg: TrainConfig) -> list[str]:
    """Flags reproducing cfg (every field that differs from the CLI default)."""
    args, default = [], TrainConfig()
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def _losses(out: Path) -> dict[int, float]:
    """step -> loss; a rerun appends to metrics.jsonl, the last line of a step wins."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _params(out: Path):
    return jax.tree.leaves(model.load_msgpack(out / "draft_params.msgpack")[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("train_run"))


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Environment of CLI runs: the test process's XLA flags and matmul precision, and one
    persistent compilation cache so the killed run and its rerun reuse the reference's compile."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cli(cfg: TrainConfig) -> list[str]:
    return [sys.executable, "-m", "train.main"] + _cli_args(cfg)


@pytest.fixture(scope="module")
def reference(data, cli_env, tmp_path_factory):
    """Uninterrupted run of the CLI on the 8-device mesh."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run(_cli(_cfg(data, out, mesh=MESH)), cwd=ROOT, env=cli_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reference_run_outputs(reference):
    out, summary = reference
    assert summary["steps"] == N_STEPS and np.isfinite(summary["final_loss"])
    assert summary["final_loss"] == _losses(out)[N_STEPS]
    assert sorted(_losses(out)) == list(range(1, N_STEPS + 1))
    assert 1.0 <= summary["expected_tau"] <= 4.0 and summary["tokens_per_s"] > 0
    assert (out / "export" / "config.json").exists() and (out / "export" / "model.safetensors").exists()
    assert list((out / "tb").iterdir()), "TensorBoard events written"
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [16, 20, 24]  # keep-last-3
    cfg_exp, params_exp = model.load_draft(out / "export")
    for a, b in zip(jax.tree.leaves(params_exp), _params(out)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.slow
def test_sharded_equals_unsharded(data, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "one_device"
    train(_cfg(data, out), devices=jax.devices()[:1])
    ref, one = _losses(ref_out), _losses(out)
    assert sorted(one) == sorted(ref)
    a, b = np.array([one[s] for s in sorted(one)]), np.array([ref[s] for s in sorted(ref)])
    print("sharded vs unsharded max rel loss diff", np.max(np.abs(a - b) / np.abs(b)))
    np.testing.assert_allclose([one[s] for s in sorted(one)], [ref[s] for s in sorted(ref)],
                               rtol=2e-6, atol=0)
    for a, b in zip(_params(out), _params(ref_out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_exact_resume_after_kill9(data, reference, cli_env, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    cmd, env = _cli(_cfg(data, out, mesh=MESH)), cli_env
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    first_ckpt = out / "checkpoints" / str(SAVE_EVERY)
    deadline = time.time() + 300
    while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + \
        (tmp_path / "first.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(out))
    assert killed_at < N_STEPS

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stderr.splitlines() if line.startswith("resumed from step")]
    assert resumed, rerun.stderr[-2000:]
    assert 0 < int(resumed[0].split()[-1]) <= killed_at
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["steps"] == N_STEPS

    ref, got = _losses(ref_out), _losses(out)
    assert sorted(got) == sorted(ref)
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]  # bit for bit
    for a, b in zip(_params(out), _params(ref_out)):
        np.testing.assert_array_equal(a, b)


def test_rerun_with_other_settings_is_refused(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(data, out, mesh=MESH)
    from train.loop import _check_run_dir
    _check_run_dir(out, cfg, {"teacher": {"path": "a"}})
    _check_run_dir(out, cfg.replace(progress=True, log_every=5), {"teacher": {"path": "a"}})
    with pytest.raises(UserError, match="lr"):
        _check_run_dir(out, cfg.replace(lr=1e-3), {"teacher": {"path": "a"}})
    with pytest.raises(UserError, match="teacher"):
        _check_run_dir(out, cfg, {"teacher": {"path": "b"}})


def test_cli_bad_input_is_one_line(data, tmp_path):
    for extra, msg in ((["--mesh", "data=3"], "--mesh"), (["--batch-size", "0"], "batch_size"),
                       (["--data", str(tmp_path / "nope")], "manifest.json not found"),
                       (["--num-processes", "2"], "go together")):
        cmd = [sys.executable, "-m", "train.main", "--data", str(data), "--out",
               str(tmp_path / "o"), "--no-progress"] + extra
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr[-1500:]
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_export_draft_from_run_checkpoint(reference, cli_env, tmp_path):
    """tools.export_draft reads the run's latest Orbax checkpoint (saved on an 8-device mesh)
    in a 1-device process; the weights equal the run's own final snapshot."""
    out, _ = reference
    env = dict(cli_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    dest = tmp_path / "zlab"
    r = subprocess.run([sys.executable, "-m", "tools.export_draft", str(out), str(dest)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint of step {N_STEPS}" in r.stderr
    cfg_exp, params_exp = model.load_draft(dest)
    assert cfg_exp == model.load_msgpack(out / "draft_params.msgpack")[0]
    for a, b in zip(jax.tree.leaves(params_exp), _params(out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_manifest_checks_against_teacher_config():
    """draft_config_for refuses caches that do not belong to the teacher, in one line."""
    from pipeline.cache.format import CacheManifest
    from train.loop import draft_config_for
    hf = {"hidden_size": 64, "num_hidden_layers": 4, "vocab_size": 300, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512}
    good = CacheManifest(seq_len=32, hidden_size=64, layer_ids=(1, 3), shards=1, commit_every=1,
                         teacher={}, mask_token_id=299, vocab_size=300)
    cfg = TrainConfig(draft_layers=1, block_size=4)
    assert draft_config_for(cfg, good, hf).mask_token_id == 299
    for change, pattern in [({"mask_token_id": 300}, "mask_token_id 300 outside"),
                            ({"mask_token_id": None}, "no mask_token_id"),
                            ({"hidden_size": 32}, "hidden size"),
                            ({"layer_ids": (1, 4)}, "layer ids"),
                            ({"vocab_size": 301}, "vocab")]:
        with pytest.raises(UserError, match=pattern):
            draft_config_for(cfg, dataclasses.replace(good, **change), hf)
