"""tools.demo stops at the first step whose CLI exits non-zero (1 included), naming the step.

The demo's steps are subprocesses; here subprocess.run is replaced by a recorder that fails one
chosen step, and the teacher build / text regeneration / untrained-draft steps by stand-ins, so
no teacher is built and nothing is trained."""
import json
import subprocess
import sys

import pytest

import tools.make_tiny_teacher
from tools import demo

STEPS = [("teacher dump", "pipeline.teacher_dump"), ("train the draft", "train.main"),
         ("speculative decoding", "tools.spec_decode")]
REPORT = {"tau": 2.0, "lossless": True, "all_lossless": True, "ngram_tau": 1.5,
          "drafts": {"trained": {"tau": 2.0}, "untrained": {"tau": 1.0}}}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls, fail = [], {}

    def run(cmd, **kw):
        assert cmd[:2] == [sys.executable, "-m"]
        calls.append(cmd[2])
        rc = fail.get(cmd[2], 0)
        out = "table\n" + json.dumps(REPORT) + "\n" if cmd[2] == "tools.spec_decode" else ""
        return subprocess.CompletedProcess(cmd, rc, stdout=out)

    monkeypatch.setattr(demo.subprocess, "run", run)
    monkeypatch.setattr(tools.make_tiny_teacher, "ensure_tiny_teacher", lambda log=None: tmp_path / "t")
    monkeypatch.setattr(demo, "regenerate", lambda teacher, out, *a: out)
    monkeypatch.setattr(demo, "make_untrained", lambda export, out, seed=1: out)
    return calls, fail


def test_all_steps_succeeding_runs_every_step(fake, tmp_path, capsys):
    calls, _ = fake
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0
    assert calls == [m for _, m in STEPS]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tau_trained"] == 2.0 and summary["lossless"] is True


@pytest.mark.parametrize("rc", [1, 2, -9])
@pytest.mark.parametrize("failing", range(len(STEPS)), ids=[n for n, _ in STEPS])
def test_a_failing_step_stops_the_demo_and_is_named(fake, tmp_path, capsys, failing, rc):
    calls, fail = fake
    name, module = STEPS[failing]
    fail[module] = rc
    assert demo.main(["--out", str(tmp_path / "demo")]) != 0
    assert calls == [m for _, m in STEPS[: failing + 1]]  # nothing after the failed step ran
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"demo step '{name}' failed with exit code {rc}" in err[0] and module in err[0]
