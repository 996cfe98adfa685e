"""tools.demo: its steps, their wiring, the first failing step stopping it, and its report.

The demo's steps are subprocesses; here demo._call is replaced by a recorder that fails one
chosen step (and, for train.main, writes the metrics.jsonl a run would), and the teacher build /
untrained-draft / held-out-prompt steps by stand-ins, so no teacher is built and nothing is
trained. The held-out prompts and the PNG are tested on their own, for real."""
import json
import subprocess
import sys

import pytest

import tools.make_tiny_teacher
from tools import _demo_report, demo

STEPS = [("regenerate", "pipeline.regenerate"), ("teacher dump", "pipeline.teacher_dump"),
         ("train the draft", "train.main"), ("speculative decoding", "tools.spec_decode")]
REPORT = {"tau": 3.0, "lossless": True, "all_lossless": True, "ngram_tau": 1.5, "block_size": 4,
          "prompts": 2, "sim_tau": 3.0, "sim_matches": True,
          "drafts": {"trained": {"tau": 3.0, "accept_hist": [1, 0, 2, 3]},
                     "untrained": {"tau": 1.0, "accept_hist": [5, 0, 0, 0]},
                     "ngram": {"tau": 1.5, "accept_hist": [3, 2, 0, 0]}}}
METRICS = [{"step": 10, "loss": 5.0}, {"step": 10, "eval_sim_tau": 1.2, "eval_loss": 5.5},
           {"step": 20, "loss": 3.0}, {"step": 20, "eval_sim_tau": 2.5, "eval_loss": 3.5}]


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls, fail, cmds = [], {}, {}

    def run(cmd):
        assert cmd[:2] == [sys.executable, "-m"]
        calls.append(cmd[2])
        cmds[cmd[2]] = cmd
        rc = fail.get(cmd[2], 0)
        if cmd[2] == "train.main" and rc == 0:
            run_dir = tmp_path / "demo" / "run"
            assert _flag(cmd, "--out") == str(run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
        out = "table\n" + json.dumps(REPORT) + "\n" if cmd[2] == "tools.spec_decode" else ""
        return subprocess.CompletedProcess(cmd, rc, stdout=out)

    monkeypatch.setattr(demo, "_call", run)
    monkeypatch.setattr(tools.make_tiny_teacher, "ensure_tiny_teacher", lambda log=None: tmp_path / "t")
    monkeypatch.setattr(demo, "heldout_prompts", lambda teacher, out, *a: out)
    monkeypatch.setattr(demo, "train_prompts", lambda out, *a: out)
    monkeypatch.setattr(demo, "make_untrained", lambda export, out, seed=1: out)
    return calls, fail, cmds


def test_all_steps_succeeding_runs_every_step(fake, tmp_path, capsys):
    calls, _, _ = fake
    assert demo.main(["--out", str(tmp_path / "demo")]) == 0
    assert calls == [m for _, m in STEPS]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tau_trained"] == 3.0 and summary["tau_untrained"] == 1.0
    assert summary["ngram_tau"] == 1.5 and summary["trained_over_ngram"] == 2.0
    assert summary["lossless"] is True
    assert summary["heldout_sim_tau"] == [[10, 1.2], [20, 2.5]]  # the run's held-out rows, in order
    from PIL import Image
    with Image.open(tmp_path / "demo" / "demo.png") as img:
        assert img.format == "PNG" and img.size == (_demo_report.W, _demo_report.H)


def test_steps_read_what_the_previous_step_wrote(fake, tmp_path):
    """Regenerated from the training split -> dumped -> trained with a held-out fraction ->
    decoded on the held-out prompts file, the draft being the run's export."""
    _, _, cmds = fake
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--prompt-tokens", "16", "--new-tokens", "48",
                      "--prompts-train", "100", "--eval-fraction", "0.1"]) == 0
    regen, dump, train, dec = (cmds[m] for _, m in STEPS)
    assert _flag(regen, "--data") == str(out / "train_prompts.jsonl")
    assert _flag(regen, "--max-prompts") == "100"
    assert _flag(regen, "--max-new-tokens") == "48" and _flag(regen, "--prompt-tokens") == "16"
    assert _flag(dump, "--data") == _flag(regen, "--out")
    assert _flag(dump, "--seq-len") == "64"  # prompt + generated tokens: nothing cut off
    assert _flag(train, "--data") == _flag(dump, "--out") and _flag(train, "--eval-fraction") == "0.1"
    assert int(_flag(train, "--eval-max")) >= 1
    assert int(_flag(train, "--eval-every")) < int(_flag(train, "--steps"))  # tau seen rising
    assert _flag(dec, "--draft") == str(out / "run" / "export")
    assert _flag(dec, "--prompts") == str(out / "heldout_prompts.jsonl")
    assert _flag(dec, "--max-new-tokens") == "48" and "--simulate" in dec
    assert _flag(dec, "--compare-draft") == f"untrained={out / 'untrained'}"


@pytest.mark.parametrize("rc", [1, 2, -9])
@pytest.mark.parametrize("failing", range(len(STEPS)), ids=[n for n, _ in STEPS])
def test_a_failing_step_stops_the_demo_and_is_named(fake, tmp_path, capsys, failing, rc):
    calls, fail, _ = fake
    name, module = STEPS[failing]
    fail[module] = rc
    assert demo.main(["--out", str(tmp_path / "demo")]) != 0
    assert calls == [m for _, m in STEPS[: failing + 1]]  # nothing after the failed step ran
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"demo step '{name}' failed with exit code {rc}" in err[0] and module in err[0]
    assert not (tmp_path / "demo" / "demo.png").exists()


def test_heldout_prompts_are_the_heldout_documents_first_tokens(tmp_path):
    """Oracle: the corpus's held-out files read and tokenized here; none is a training file."""
    from pipeline.data import corpus
    from tests._data_fixtures import build_small_tokenizer

    tok = build_small_tokenizer(tmp_path / "tok")
    path = demo.heldout_prompts(tmp_path / "tok", tmp_path / "p.jsonl", 3, 16, 1500)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    docs = [(p, t) for p, t in corpus.iter_texts("heldout")][:3]
    train = {p for p, _ in corpus.iter_texts("train")}
    assert len(rows) == 3 and not train & {p for p, _ in docs}
    for row, (_, text) in zip(rows, docs):
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"][:16]


def test_corpus_windows_cut_files_round_robin_at_line_starts(monkeypatch):
    from pipeline.data import corpus

    a = "aaaa\nbb\ncccccc\ndd\n"  # stride 5: cuts at 0, 8 (the line after offset 5), 15 (after 13)
    b = "xxxxxxx\nyy\n"  # cuts at 0, 8
    monkeypatch.setattr(corpus, "iter_texts", lambda split: [("a", a), ("b", b)] if split == "s" else [])
    assert demo.corpus_windows("s", 10, 5) == ["aaaa\n", "xxxxx", "cccccc"[:5], "yy\n", "dd\n"]
    assert demo.corpus_windows("s", 3, 5) == ["aaaa\n", "xxxxx", "ccccc"]


def test_corpus_windows_of_the_training_split_are_many_and_not_held_out():
    from pipeline.data import corpus

    texts = [t for _, t in corpus.iter_texts("train")]
    held = "".join(t for _, t in corpus.iter_texts("heldout"))
    windows = demo.corpus_windows("train", 3 * len(texts), 800)
    assert len(windows) == 3 * len(texts)  # well over one prompt per file
    assert windows[: len(texts)] == [t[:800] for t in texts]  # every file's first snippet first
    assert not any(w in held for w in windows[len(texts):len(texts) + 50])


def test_histograms_are_drawn_to_scale(tmp_path):
    """Each proposer's bars: height proportional to its share of steps, on one shared scale
    (measured in pixels of the proposer's colour in its panel)."""
    import numpy as np
    from PIL import Image

    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    png = _demo_report.plot(REPORT, tmp_path / "m.jsonl", tmp_path / "x.png")
    px = np.asarray(Image.open(png).convert("RGB"))
    third = _demo_report.W // 3
    hists = {n: np.asarray(REPORT["drafts"][n]["accept_hist"]) for n, _ in _demo_report.PROPOSERS}
    shares = {n: h / h.sum() for n, h in hists.items()}
    top = 1.1 * max(s.max() for s in shares.values())  # the shared y range: 0 .. 1.1 x tallest
    plot_h = _demo_report.H // 2 - _demo_report.MARGIN["top"] - _demo_report.MARGIN["bottom"]
    for i, (name, color) in enumerate(_demo_report.PROPOSERS):
        panel = px[_demo_report.H // 2:, i * third:(i + 1) * third]
        ours = np.all(panel == color, axis=-1)
        cols = np.nonzero(ours.any(axis=0))[0]
        bars = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
        heights = [int(ours[:, b].sum(axis=0).max()) for b in bars]
        want = [s / top * plot_h for s in shares[name] if s]
        assert len(heights) == len(want)
        np.testing.assert_allclose(heights, want, atol=2)  # pixel rounding, edges inclusive


def test_teacher_flag_uses_that_snapshot_and_builds_nothing(fake, tmp_path, monkeypatch):
    _, _, cmds = fake

    def build(log=None):
        raise AssertionError("built the tiny teacher although --teacher was given")

    monkeypatch.setattr(tools.make_tiny_teacher, "ensure_tiny_teacher", build)
    assert demo.main(["--out", str(tmp_path / "demo"), "--teacher", str(tmp_path / "mine")]) == 0
    for module in ("pipeline.regenerate", "pipeline.teacher_dump", "tools.spec_decode"):
        assert _flag(cmds[module], "--model") == str(tmp_path / "mine")


def test_step_stderr_is_relayed_less_the_xla_cache_lines(capfd):
    """A step's stderr reaches the user line by line, except XLA:CPU's two spurious "+prefer-no-*
    is not supported" lines per cache load; its stdout is returned, its exit code kept."""
    script = ("import sys; print('result'); "
              "sys.stderr.write('step 1 loss 2.0\\n'); "
              "sys.stderr.write('E1128 cpu_aot_loader.cc:220] Target machine feature "
              "+prefer-no-gather is not supported\\n'); "
              "sys.stderr.write('error: real trouble\\n'); sys.exit(3)")
    proc = demo._call([sys.executable, "-c", script])
    err = capfd.readouterr().err
    assert proc.returncode == 3 and proc.stdout == "result\n"
    assert err == "step 1 loss 2.0\nerror: real trouble\n"
