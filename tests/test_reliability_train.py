"""Issue 22, the trainer as a user runs it: SIGTERM saves and exits 75, the rerun resumes to the
uninterrupted run's export (item 3) with TensorBoard holding each step once (item 8); a second
trainer on the same --out is refused in one line (item 4); a full disk is one line and the stale
temporary checkpoint is removed by the next run (item 5, on a real few-MB tmpfs)."""
import shutil
import signal
import subprocess
from collections import Counter

import pytest

from tests._reliability_fixtures import (
    ROOT, assert_hints_are_flags, assert_same_export, one_line, run, small_tmpfs, tb_scalars,
    train_cmd, wait_for_lines)
from tests._train_fixtures import small_run_data

STEPS = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Cache, and an uninterrupted STEPS-step run on it (one save, at the end)."""
    tmp = tmp_path_factory.mktemp("rel_train")
    data = small_run_data(tmp, seq_len=32)
    out = tmp / "ref"
    r = run(train_cmd(data, out, STEPS, "--save-every", 1000))
    assert r.returncode == 0, r.stderr[-3000:]
    return data, out


@pytest.mark.slow
def test_sigterm_saves_resumes_and_second_trainer_refused(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(data, out, STEPS, "--save-every", 1000), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(out / "metrics.jsonl", 3, first)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run while a second trainer tries --out
        second = run(train_cmd(data, out, STEPS))
        assert second.returncode == 2
        assert "another trainer is running in --out" in one_line(second.stderr)
        assert_hints_are_flags(one_line(second.stderr), "train.main")
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75, err[-3000:]
    line = one_line(err, "preempted:")
    stopped = int(line.split("after step ")[1].split()[0])
    assert 3 <= stopped < STEPS, line
    assert (out / "checkpoints" / str(stopped)).is_dir()  # saved although --save-every is 1000

    r = run(train_cmd(data, out, STEPS, "--save-every", 1000))
    assert r.returncode == 0 and f"resumed from step {stopped}" in r.stderr, r.stderr[-3000:]
    assert_same_export(out, ref)
    # TensorBoard: each (tag, step) once, the same set as the uninterrupted run's
    got, want = tb_scalars(out / "tb"), tb_scalars(ref / "tb")
    assert max(Counter(got).values()) == 1
    assert sorted(got) == sorted(want)


@pytest.mark.slow
def test_full_disk_is_one_line_and_stale_tmp_removed(reference, tmp_path):
    data, ref = reference
    with small_tmpfs("3m") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case is untested")
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (2 << 20) + b"\0" * (700 << 10))  # ~300 KB left
        out = mnt / "run"
        r = run(train_cmd(data, out, STEPS, "--save-every", 20))
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert "no space left on the device holding --out" in line
        assert_hints_are_flags(line, "train.main")
        assert not list((out / "checkpoints").glob("*")), "nothing half-written"
        filler.unlink()
        # what a save cut short inside Orbax leaves: an uncommitted step directory
        stale = out / "checkpoints" / "20.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
        stale.mkdir(parents=True)
        (stale / "d").write_bytes(b"\0" * 1000)
        r = run(train_cmd(data, out, STEPS, "--save-every", 20))
        assert r.returncode == 0, r.stderr[-3000:]
        assert not list((out / "checkpoints").glob("*tmp*"))
        assert_same_export(out, ref)
        shutil.rmtree(out)


@pytest.mark.slow
def test_memory_preflight_counts_the_heldout_evaluation_forward(reference, tmp_path):
    """Issue 22, item 8: with an anchor at every position the held-out forward can outweigh a
    small step; the pre-flight's peak is the larger of the two, so a limit between the step's
    and the evaluation's needs is refused in one line naming the evaluation."""
    import json

    data, _ = reference
    small = ["--batch-size", "8", "--anchors-per-seq", "1", "--eval-fraction", "0.34",
             "--eval-every", "2"]
    cmd = train_cmd(data, tmp_path / "ok", 2, "--save-every", 1000)
    r = run(cmd + small)  # argparse: the last of a repeated flag wins
    assert r.returncode == 0, r.stderr[-3000:]
    est = json.loads((tmp_path / "ok" / "memory.json").read_text())
    step, evals = est["step_device_bytes"], est["eval_device_bytes"]
    assert evals > step > 0
    n = est["local_devices"]  # CPU devices are host RAM
    assert est["host_bytes"] == est["loader_bytes"] + est["save_bytes"] + evals * n
    limit = (est["host_bytes"] - (evals - step) * n // 2) / 1e9  # fits the step alone, not eval
    cmd = train_cmd(data, tmp_path / "no", 2, "--memory-limit-gb", f"{limit:.9f}")
    r = run(cmd + small)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "held-out evaluation forward" in line and "--eval-fraction 0" in line, line
    assert_hints_are_flags(line, "train.main")
