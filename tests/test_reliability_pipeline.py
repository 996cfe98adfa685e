"""Issue 22 through the pipeline CLIs as a user runs them: SIGTERM stops the dump and regenerate
after a commit (one line, exit 75) and the rerun ends byte-identical to an uninterrupted run
(item 3); a chat prompt longer than the teacher's positions is refused by regenerate in one line
naming its real flags, by the rule spec_decode applies to its prompts too (items 6, 7)."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._dump_fixtures import REPO, assert_same_cache, run_fake_cli
from tests._reliability_fixtures import assert_hints_are_flags, one_line, run

DUMP = ["--seq-len", "64", "--shards", "2", "--batch-size", "8", "--commit-every", "16",
        "--model", "fake"]
N = 800


def _committed(path: Path, key: str) -> int:
    try:
        return int(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError):
        return 0


def _term_after(cmd, ledger: Path, key: str, timeout: float = 600):
    """Start cmd, SIGTERM it once its ledger has a commit; (returncode, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while _committed(ledger, key) < 1:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < timeout
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_dump_sigterm_commits_exits_75_and_resumes_to_the_same_cache(tmp_path):
    ref = tmp_path / "ref"
    r = run_fake_cli([*DUMP, "--out", str(ref)], N)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "tests._dump_fixtures", "--fake-n", str(N), "--", *DUMP,
           "--out", str(out), "--no-progress"]
    rc, err = _term_after(cmd, out / "ledger.json", "committed")
    assert rc == 75, err[-3000:]
    line = one_line(err, "preempted:")
    done = int(line.split("; ")[1].split()[0])
    assert 16 <= done < N and done % 16 == 0, line
    assert _committed(out / "ledger.json", "committed") == done
    r = run_fake_cli([*DUMP, "--out", str(out)], N)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"after {done} committed sequences" in r.stderr
    assert_same_cache(ref, out)


REGEN = ["--model", "tiny", "--max-prompts", "8", "--max-new-tokens", "6", "--batch-size", "2",
         "--commit-every", "2", "--prompt-tokens", "16", "--no-progress"]


@pytest.fixture(scope="module")
def tiny():
    from pipeline.teacher.tiny import ensure_tiny_teacher
    return ensure_tiny_teacher()  # cached in /dev/shm: built once per machine


@pytest.mark.slow
def test_regenerate_sigterm_stops_after_a_part_and_resumes_identically(tiny, tmp_path):
    regen = [sys.executable, "-m", "pipeline.regenerate", *REGEN]
    ref = tmp_path / "ref"
    r = run([*regen, "--out", str(ref)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cut"
    rc, err = _term_after([*regen, "--out", str(out)], out / "regenerate-ledger.json",
                          "prompts_done")
    assert rc == 75, err[-3000:]
    line = one_line(err, "preempted:")
    done = int(line.split("; ")[1].split()[0])
    assert 2 <= done < 8, line
    r = run([*regen, "--out", str(out)], timeout=600)
    assert r.returncode == 0 and f"after {done} committed prompts" in r.stderr, r.stderr[-3000:]
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for n in names:
        assert (ref / n).read_bytes() == (out / n).read_bytes(), n


def test_chat_prompt_longer_than_the_teacher_is_refused_like_spec_decode_prompts(tiny, tmp_path):
    """The tiny teacher has 1024 positions; a chat turn of ~3000 tokens used to be generated from
    (exit 0). regenerate refuses it before writing, naming the line and its own flags; the
    rule is pipeline/data/limits.py, the one spec_decode's prompt loader applies."""
    from pipeline.data.prompts import load_prompts, load_tokenizer
    from pipeline.errors import UserError

    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "def f(x):\n    return x\n"}]},
            {"messages": [{"role": "user", "content": "import os\n" * 1500}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "regen"
    r = run([sys.executable, "-m", "pipeline.regenerate", "--model", "tiny", "--data", str(data),
             "--out", str(out), "--max-new-tokens", "8", "--no-progress"], timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_line(r.stderr)
    assert f"{data}:2: the prompt's" in line and "max_position_embeddings 1024" in line, line
    assert_hints_are_flags(line, "pipeline.regenerate")
    assert not out.exists()
    with pytest.raises(UserError) as e:  # spec_decode's loader: the same words for the same line
        load_prompts(str(data), load_tokenizer(tiny), positions=1024, max_new_tokens=8)
    # (regenerate renders the assistant turn up to its content, spec_decode the generation
    # prompt: a few tokens apart, so the counts may differ; the rule and its words do not)
    strip = lambda t: re.sub(r"\d+", "N", t.split("the prompt's")[1])  # noqa: E731
    assert str(e.value).startswith(f"{data}:2: the prompt's")
    assert strip(line) == strip(str(e.value))


def test_stderr_filter_drops_only_the_known_lines_even_when_the_cli_aborts(tmp_path):
    """The filter every CLI installs: XLA:CPU's "+prefer-no-*" E-lines and Grain's jaxlib warning
    go, everything else arrives in order, including what was written just before an abort."""
    script = tmp_path / "cli.py"
    script.write_text(
        "import os, sys\n"
        "from pipeline.stderr_filter import install\n"
        "install()\n"
        "sys.stderr.write('step 1\\n'); sys.stderr.flush()\n"
        "os.write(2, b'E1205 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine "
        "feature +prefer-no-gather is not  supported on the host machine.\\n')\n"
        "os.write(2, b'WARNING:absl:Grain multiprocess worker profiling requires jaxlib "
        "extension version 448 or later\\n')\n"
        "os.write(2, b'F1205 check failed: last words')\n"
        "os.abort()\n")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGABRT
    assert r.stderr == "step 1\nF1205 check failed: last words"
    # Ctrl-C reaches the whole process group; the filter is not in it, so the CLI's last line
    # ("error: interrupted ...") still arrives
    script.write_text(
        "import os, signal, sys, time\n"
        "from pipeline.stderr_filter import install\n"
        "install()\n"
        "try:\n"
        "    os.killpg(os.getpgrp(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    sys.stderr.write('error: interrupted\\n')\n"
        "    sys.exit(130)\n")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                       timeout=60, start_new_session=True)
    assert (r.returncode, r.stderr) == (130, "error: interrupted\n")


@pytest.mark.slow
def test_dump_cli_stderr_has_no_xla_cache_lines(tiny, tmp_path):
    """The tiny dump loads the teacher's programs from the persistent compilation cache (warm
    after the suite's earlier tiny dumps), where XLA:CPU prints its two spurious E-lines; the CLI
    drops them and nothing else."""
    r = run([sys.executable, "-m", "pipeline.teacher_dump", "--model", "tiny", "--seq-len", "32",
             "--max-seqs", "2", "--batch-size", "2", "--shards", "1", "--no-progress",
             "--out", str(tmp_path / "b")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prefer-no-" not in r.stderr and "Grain multiprocess" not in r.stderr
    assert r.stdout.strip().startswith("{")  # the result line is untouched
