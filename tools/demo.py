"""`make demo`: the whole mission on the embedded tiny teacher, on CPU, in minutes.

    python -m tools.demo [--out /dev/shm/dflash/demo] [--prompts-train 2048] [--steps 240]

1. build (first run) / load the tiny GPT-OSS teacher;
2. regenerate training data with the teacher (`pipeline.regenerate`: greedy continuations of the
   corpus's training split; the draft must imitate the teacher, not the corpus);
3. dump the teacher's features of the regenerated data (`pipeline.teacher_dump`);
4. train a small draft (`train.main`) with held-out evaluation: a fraction of the sequences is
   never trained on and simulated tau on it is logged every --eval-every steps;
5. speculative decoding on prompts from the corpus's held-out split (never trained on) with
   `tools.spec_decode`: the trained draft vs an untrained draft of the same shape vs n-gram
   prompt lookup, lossless check included;
6. the table, and a PNG (held-out simulated tau and loss against step; accepted-length
   histograms side by side): tools/_demo_report.py.
Each step is the real CLI in a subprocess and a failing one stops the demo, naming it; rerunning
resumes / reuses what is complete.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.stderr_filter import is_benign


class StepFailed(Exception):
    """A demo step's CLI exited non-zero; the demo stops there (later steps would read its output)."""


def _run(step: str, args, log) -> str:
    """Run `python -m ARGS` as the demo step `step`; its stdout, or StepFailed on any non-zero exit
    (exit 1 too: spec_decode's "not lossless" is a failure of the demo, not a result to print)."""
    log("$ python -m " + " ".join(args))
    t0, cpu0 = time.monotonic(), _child_cpu()
    proc = _call([sys.executable, "-m", *args])
    if proc.returncode != 0:
        if proc.stdout:
            print(proc.stdout, end="" if proc.stdout.endswith("\n") else "\n")
        raise StepFailed(f"demo step '{step}' failed with exit code {proc.returncode}: "
                         f"python -m {' '.join(args)}")
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    if last and step != "speculative decoding":  # the CLI's one-line JSON result
        log("  " + last[0])
    # CPU seconds beside wall seconds: on a shared machine the wall time says little on its own
    log(f"  ({time.monotonic() - t0:.0f} s wall, {_child_cpu() - cpu0:.0f} s CPU)")
    return proc.stdout


# XLA:CPU's spurious "+prefer-no-*" lines and Grain's jaxlib warning are dropped by the rule
# every CLI filters its own stderr with (pipeline/stderr_filter.py); steps pass the rest on.


def _call(cmd) -> subprocess.CompletedProcess:
    """Run cmd; stdout captured, stderr relayed line by line as it comes, less the benign lines."""
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr,), daemon=True)
    relay.start()
    stdout = proc.stdout.read()
    proc.wait()
    relay.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout)


def _relay_stderr(stream) -> None:
    for line in stream:
        if not is_benign(line):
            sys.stderr.write(line)
            sys.stderr.flush()


def _child_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def corpus_windows(split: str, n: int, stride: int) -> list[str]:
    """Up to `n` snippets of the corpus split: each file cut every ~`stride` characters (at the next
    line start), taken round-robin (every file's first snippet, then every second one, ...), so
    that a small `n` still spans the whole split. The stdlib has ~700 training files: one prompt
    per file would be too few sequences to train a draft on."""
    from pipeline.data import corpus

    per_file = []
    for _, text in corpus.iter_texts(split):
        starts, at = [], 0
        while at < len(text) and text[at:at + stride].strip():
            starts.append(at)
            nxt = text.find("\n", at + stride)
            at = len(text) if nxt < 0 else nxt + 1
        per_file.append([text[a:a + stride] for a in starts])
    out = [w[i] for i in range(max(map(len, per_file), default=0)) for w in per_file if i < len(w)]
    return out[:n]


def train_prompts(out: Path, n: int, stride: int) -> Path:
    """The training split's snippets as {"text"} jsonl: `pipeline.regenerate` continues each."""
    rows = [json.dumps({"text": t}) for t in corpus_windows("train", n, stride)]
    return _write(out, rows)


def heldout_prompts(teacher: Path, out: Path, n: int, prompt_tokens: int, stride: int) -> Path:
    """The held-out split's first `n` snippets, cut to `prompt_tokens` tokens exactly as
    `pipeline.regenerate` cuts its training prompts, as an input_ids jsonl for tools.spec_decode."""
    from pipeline.data.prompts import load_tokenizer
    from pipeline.regen.prompts import text_prompt_ids

    tok = load_tokenizer(teacher)
    return _write(out, [json.dumps({"input_ids": text_prompt_ids(tok, t, prompt_tokens)})
                        for t in corpus_windows("heldout", n, stride)])


def _write(out: Path, rows: list) -> Path:
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.rename(out)
    return out


def make_untrained(export: Path, out: Path, seed: int = 1) -> Path:
    """A freshly initialised draft of the trained one's shape (the "no training" control)."""
    import jax

    import model

    config, _ = model.load_draft(export)
    model.save_draft(out, config, model.init_draft_params(config, jax.random.PRNGKey(seed)))
    return out


def main(argv=None) -> int:
    try:
        return _main(argv)
    except StepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    add("--out", default="/dev/shm/dflash/demo", help="demo directory")
    add("--teacher", default=None,
        help="teacher snapshot dir to use as is (default: the tiny teacher, built on first use)")
    add("--prompts-train", type=int, default=2048,
        help="training-split snippets the teacher continues (one sequence each)")
    add("--stride", type=int, default=1500, help="characters between snippets of one corpus file")
    add("--prompt-tokens", type=int, default=32, help="tokens of each document the teacher continues")
    add("--new-tokens", type=int, default=64,
        help="tokens the teacher writes per sequence (regeneration and decoding)")
    add("--regen-batch", type=int, default=256, help="sequences regenerated together")
    add("--steps", type=int, default=240, help="draft training steps")
    add("--batch-size", type=int, default=8, help="training batch (sequences)")
    add("--lr", type=float, default=3e-3, help="draft learning rate (tiny draft: high)")
    add("--block-size", type=int, default=8)
    add("--draft-layers", type=int, default=2)
    add("--anchors-per-seq", type=int, default=32)
    add("--eval-fraction", type=float, default=0.03, help="sequences held out of training")
    add("--eval-max", type=int, default=32,
        help="at most this many held-out sequences (each evaluation costs a few training steps)")
    add("--eval-every", type=int, default=40, help="steps between held-out evaluations")
    add("--prompts", type=int, default=12, help="held-out-split prompts to decode")
    return ap.parse_args(argv)


def _main(argv=None) -> int:
    a = parse(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    seq_len = a.prompt_tokens + a.new_tokens

    from tools.make_tiny_teacher import ensure_tiny_teacher

    log("[1/6] teacher")
    teacher = Path(a.teacher) if a.teacher else ensure_tiny_teacher(log=log)
    log(f"  {teacher}")
    log("[2/6] regenerate training data with the teacher (greedy)")
    data = train_prompts(out / "train_prompts.jsonl", a.prompts_train, a.stride)
    _run("regenerate", ["pipeline.regenerate", "--model", str(teacher), "--data", str(data),
                        "--out", str(out / "regenerated"), "--max-prompts", str(a.prompts_train),
                        "--prompt-tokens", str(a.prompt_tokens), "--max-new-tokens", str(a.new_tokens),
                        "--batch-size", str(a.regen_batch), "--no-progress"], log)
    log("[3/6] dump the teacher's features")
    _run("teacher dump",
         ["pipeline.teacher_dump", "--model", str(teacher), "--data", str(out / "regenerated"),
          "--out", str(out / "cache"), "--shards", "4", "--seq-len", str(seq_len),
          "--max-seqs", str(a.prompts_train), "--dtype", "float32",
          "--block-size", str(a.block_size), "--no-progress"], log)
    log("[4/6] train the draft, evaluating on held-out sequences")
    _run("train the draft",
         ["train.main", "--data", str(out / "cache"), "--out", str(out / "run"), "--steps", str(a.steps),
          "--batch-size", str(a.batch_size), "--block-size", str(a.block_size),
          "--draft-layers", str(a.draft_layers), "--anchors-per-seq", str(a.anchors_per_seq),
          "--lr", str(a.lr), "--compute-dtype", "float32", "--save-every", str(a.steps),
          "--eval-fraction", str(a.eval_fraction), "--eval-max", str(a.eval_max),
          "--eval-every", str(a.eval_every),
          "--mesh", "data=1,fsdp=1,tensor=1", "--no-progress"], log)
    export = out / "run" / "export"
    untrained = make_untrained(export, out / "untrained")
    prompts = heldout_prompts(teacher, out / "heldout_prompts.jsonl", a.prompts, a.prompt_tokens,
                              a.stride)
    log("[5/6] speculative decoding on held-out prompts: trained vs untrained vs n-gram")
    stdout = _run("speculative decoding",
                  ["tools.spec_decode", "--draft", str(export), "--model", str(teacher),
                   "--prompts", str(prompts), "--max-new-tokens", str(a.new_tokens),
                   "--label", "trained", "--compare-draft", f"untrained={untrained}", "--simulate"], log)
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1])
    log("[6/6] report")
    print("\n".join(lines[:-1]))
    from tools import _demo_report

    summary = _demo_report.summary(report, out / "run" / "metrics.jsonl", time.monotonic() - t0)
    png = _demo_report.plot(report, out / "run" / "metrics.jsonl", out / "demo.png")
    log(_demo_report.format_summary(summary) + f"\n  plot: {png}")
    print(json.dumps(summary))
    return 0 if report["all_lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
