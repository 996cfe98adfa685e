"""Online training (train/online.py, issue 21) on the tiny teacher in float32, against two
independent oracles: cache training over a real `teacher_dump` of the same data (N online steps
== N cache steps, bit for bit: same parameters, losses and held-out figures), and an
uninterrupted online run (kill -9 of the CLI at random moments, rerun: the same export). Also:
the memory pre-flight's one-line refusal, bad input, and the cache path never importing easydel.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import model
from pipeline import teacher_dump
from pipeline.cache.format import record_nbytes
from pipeline.dump import plan as dump_plan
from pipeline.dump.run import DumpConfig, build_manifest, run_dump
from pipeline.dump.sources import default_sequences, teacher_info
from pipeline.errors import UserError
from train.config import TrainConfig
from train.loop import train
from train.online import dump_config
from train.tokens import TokenSequences

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, N_SEQS, STEPS, SAVE_EVERY = 64, 24, 6, 2


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    """A directory of .py files (this repository's model/ package): raw data, no cache."""
    d = tmp_path_factory.mktemp("raw")
    for f in sorted((ROOT / "model").glob("*.py")):
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _online_cfg(data, out, **kw) -> TrainConfig:
    base = dict(teacher="tiny", data=str(data), out=str(out), seq_len=SEQ_LEN, max_seqs=N_SEQS,
                teacher_dtype="float32", steps=STEPS, save_every=SAVE_EVERY, eval_fraction=0.1)
    return TrainConfig.tiny(**{**base, **kw})


@pytest.fixture(scope="module")
def online_run(raw_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "run"
    return out, train(_online_cfg(raw_data, out))


def _rows(out: Path) -> dict:
    """step -> merged metrics row (training and held-out lines; the last line of a step wins)."""
    rows: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return rows


def _params(out: Path):
    return jax.tree.leaves(model.load_msgpack(out / "draft_params.msgpack")[1])


@pytest.mark.slow
def test_online_equals_cache_training(raw_data, online_run, tmp_path):
    """The oracle: dump the same data with the real dump (the teacher in float32, the dump's own
    batches), train on that cache with the same seed: identical runs."""
    cache = tmp_path / "cache"
    run_dump(DumpConfig(model="tiny", data=str(raw_data), out=str(cache), seq_len=SEQ_LEN,
                        max_seqs=N_SEQS, dtype="float32", shards=2, commit_every=8,
                        progress=False), log=lambda m: None)
    ref = tmp_path / "cache_run"
    summary_ref = train(TrainConfig.tiny(data=str(cache), out=str(ref), steps=STEPS,
                                         save_every=SAVE_EVERY, eval_fraction=0.1))
    out, summary = online_run
    assert summary["steps"] == STEPS and summary["eval"]["sequences"] == 2
    got, want = _rows(out), _rows(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for step in want:  # training loss, gradient norm, held-out loss and simulated tau
        for key in ("loss", "grad_norm", "eval_loss", "eval_sim_tau", "eval_acc_slot1"):
            assert got[step].get(key) == want[step].get(key), (step, key)
    assert summary["final_loss"] == summary_ref["final_loss"]
    for a, b in zip(_params(out), _params(ref)):
        np.testing.assert_array_equal(a, b)
    exp_a, exp_b = model.load_draft(out / "export"), model.load_draft(ref / "export")
    assert exp_a[0] == exp_b[0]  # same draft config: layer ids, mask id, vocab from the teacher
    for a, b in zip(jax.tree.leaves(exp_a[1]), jax.tree.leaves(exp_b[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cli(cfg: TrainConfig) -> list[str]:
    args, default = [], TrainConfig()
    for name, v in cfg.to_dict().items():
        if v == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        args += ([flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)])
    return [sys.executable, "-m", "train.main"] + args


@pytest.mark.slow
def test_online_resume_after_kill9_at_random_moments(raw_data, online_run, tmp_path):
    """kill -9 of the CLI at a random moment of training, twice, then a rerun: the export and
    the parameters equal the uninterrupted online run's (the loader's position over the raw
    sequences is in each checkpoint)."""
    ref_out, _ = online_run
    out = tmp_path / "run"
    cmd = _cli(_online_cfg(raw_data, out))
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT))
    seed = int(os.environ.get("DFLASH_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    for attempt in range(2):
        log = open(tmp_path / f"killed{attempt}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        metrics, deadline = out / "metrics.jsonl", time.time() + 400
        start = len(_rows(out)) if metrics.exists() else 0
        # training is under way once a new metrics line exists; then any moment will do
        while proc.poll() is None and time.time() < deadline and (
                not metrics.exists() or len(_rows(out)) <= start):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is not None:
            break  # finished before the moment came: the rerun below has nothing to resume
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (seed, rerun.stderr[-3000:])
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["steps"] == STEPS
    for a, b in zip(_params(out), _params(ref_out)):
        np.testing.assert_array_equal(a, b, err_msg=f"DFLASH_TEST_SEED={seed}")
    for a, b in zip(jax.tree.leaves(model.load_draft(out / "export")[1]),
                    jax.tree.leaves(model.load_draft(ref_out / "export")[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["loss"] for _, r in sorted(_rows(out).items())] == \
        [r["loss"] for _, r in sorted(_rows(ref_out).items())]


@pytest.mark.slow
def test_preflight_refuses_in_one_line_naming_flags(raw_data, tmp_path):
    """Host memory the teacher, the tokens and the step cannot fit in: refused before anything
    is written, naming the online flags."""
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(_online_cfg(raw_data, out, memory_limit_gb=0.01))
    msg = str(e.value)
    assert "\n" not in msg and "online training will not fit" in msg
    for flag in ("--batch-size", "--seq-len", "--teacher-mesh", "--max-seqs", "--memory-limit-gb"):
        assert flag in msg
    assert "teacher" in msg.split(";")[0]  # the teacher's share is named in the figures
    assert not out.exists()


def test_cli_bad_online_input_is_one_line(raw_data, tmp_path):
    for extra, msg in ((["--data", str(tmp_path / "nope")], "no such file"),
                       (["--teacher", str(tmp_path)], "config.json"),
                       (["--teacher-mesh", "1,1,1,3,1"], "--teacher-mesh"),
                       (["--seq-len", "4"], "--block-size")):
        cmd = [sys.executable, "-m", "train.main", "--teacher", "tiny", "--data", str(raw_data),
               "--out", str(tmp_path / "o"), "--no-progress", "--max-seqs", "4", "--seq-len",
               str(SEQ_LEN)] + extra
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], (extra, r.stderr[-1500:])
        assert "Traceback" not in r.stderr


def test_cache_path_does_not_import_easydel():
    """train.main and the loop on a cache import neither easydel nor the online module."""
    code = ("import sys, train.main, train.loop; "
            "print(sorted(m for m in ('easydel', 'train.online') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_dump_plan_counts_and_refuses_before_writing(raw_data, tmp_path, monkeypatch, capsys):
    """--plan counts what the online run trains on (the same rows); a dump whose cache cannot
    fit the free space is refused in one line before anything is written or loaded."""
    out = tmp_path / "cache"
    args = ["--model", "tiny", "--data", str(raw_data), "--seq-len", str(SEQ_LEN), "--out",
            str(out), "--no-progress"]
    assert teacher_dump.main(args + ["--plan"]) == 0
    printed = capsys.readouterr()
    p = json.loads(printed.out.strip().splitlines()[-1])
    cfg = dump_config(_online_cfg(raw_data, tmp_path / "r", max_seqs=None))
    info = teacher_info(cfg)
    manifest = build_manifest(cfg, info)
    n = len(TokenSequences.build(default_sequences(cfg, info), manifest))
    assert p["sequences"] == n and p["tokens"] == n * SEQ_LEN
    assert p["bytes"] == n * record_nbytes(SEQ_LEN, manifest.feature_dim) and p["fits"] is True
    assert "sequences" in printed.err and "fits" in printed.err and not out.exists()
    assert dump_plan.sequences_bound(str(raw_data), SEQ_LEN) >= n  # the guard's shortcut

    real = dump_plan.shutil.disk_usage
    monkeypatch.setattr(dump_plan.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=p["bytes"] // 2))
    assert teacher_dump.main(args) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "will not fit" in err[0] and "--max-seqs" in err[0]
    assert "train.main --teacher" in err[0] and not out.exists()
    fit = int(err[0].split("--max-seqs ")[1].split()[0])
    assert 0 < fit < n  # the suggested count fits the free space
    assert fit * record_nbytes(SEQ_LEN, manifest.feature_dim) <= p["bytes"] // 2


def test_run_started_before_the_online_fields_resumes(tmp_path):
    """run.json written before the online fields existed: a cache run resumes (they took their
    defaults); changing one of them is still refused."""
    from train.loop import _check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig.tiny(data=str(tmp_path / "cache"), out=str(out))
    _check_run_dir(out, cfg, {"teacher": {"path": "a"}})
    run = json.loads((out / "run.json").read_text())
    for k in ("teacher", "seq_len", "max_seqs", "teacher_layers", "teacher_dtype", "teacher_mesh"):
        del run["train"][k]
    (out / "run.json").write_text(json.dumps(run))
    _check_run_dir(out, cfg, {"teacher": {"path": "a"}})
    with pytest.raises(UserError, match="seq_len"):
        _check_run_dir(out, cfg.replace(seq_len=128), {"teacher": {"path": "a"}})
