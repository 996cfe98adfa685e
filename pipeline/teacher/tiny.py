"""The embedded tiny GPT-OSS teacher: build it (tokenizer + trained weights as a standard HF
snapshot), recognise a complete one, and build it once on first use (`--model tiny`).

`ensure_tiny_teacher()` builds the snapshot once (under a file lock, into a temporary directory
renamed into place, so a killed build never leaves half a snapshot) and then it loads exactly
like a downloaded gpt-oss snapshot. The recipe is pipeline/teacher/tiny_recipe.py; the CLI is
`python -m tools.make_tiny_teacher`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline.data import corpus
from pipeline.errors import UserError
from pipeline.teacher.hashing import sha256_file
from pipeline.teacher.tiny_recipe import (
    TinyTeacherConfig,
    heldout_perplexity,
    pack_documents,
    train_model,
    unigram_perplexity,
)

# $DFLASH_TINY_TEACHER moves it (e.g. to time a first build while another copy exists).
DEFAULT_OUT = Path(os.environ.get("DFLASH_TINY_TEACHER", "/dev/shm/dflash/models/tiny-gpt-oss"))
REPORT = "tiny_teacher_report.json"  # written last: its presence marks a complete snapshot
RECIPE_VERSION = 2  # bump when the recipe changes so cached default teachers are rebuilt
# sha256 of model.safetensors that the default recipe (TinyTeacherConfig(), the stdlib corpus)
# gives with the pinned torch/transformers. Training is single-threaded with a fixed data order,
# so on one machine the bytes are reproducible (tests/test_tiny_teacher.py builds twice); across
# CPUs they are not: torch's kernels take other summation orders on other ISAs/vendors (measured
# 2026-12-05 on an AMD EPYC: 663e... with its AVX-512 path, cf19... with ATEN_CPU_CAPABILITY=avx2,
# neither the 1fe0... of the earlier sessions' machines). So the pin is a table of known builds;
# a hash outside it means another recipe, torch, transformers or stdlib, or a CPU not seen yet
# (the report records which CPU built it).
KNOWN_WEIGHTS_SHA256 = {
    "1fe0f30452aa156a1f5d891067d3bdb95e3a30254c390e3d864ef4692c5235f2": "x86 CI/session machines to 2026-11-28 (CPU not recorded)",
    "663e70ec278f1e78c3fbfe10c1468f0689148c02d61a5eaab61837747af9fc4f": "AMD EPYC, torch CPU capability AVX512",
    "cf19b4ee4a5058170a0d163edef9c231291e7882e897bdc55e178510615d1534": "AMD EPYC, ATEN_CPU_CAPABILITY=avx2",
}
SNAPSHOT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", REPORT)


def _cpu_identity() -> str:
    """The CPU model and torch's kernel path: what the weights' bytes depend on besides versions."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}; torch capability {torch.backends.cpu.get_cpu_capability()}"


def _corpus_texts(split: str, corpus_dir: Path | None, max_files: int | None) -> list[str]:
    texts = [text for _, text in corpus.iter_texts(split, corpus_dir)]
    if max_files is None:
        return texts
    return texts[: max_files if split == "train" else max(1, max_files // 10)]


def _finish_config(snapshot: Path, hf_config, special_ids: dict[str, int]) -> None:
    """Make config.json read like gpt-oss-20b's for every loader, not only transformers 5.

    transformers 5 writes `rope_parameters`; EasyDeL and older readers take `rope_scaling` +
    `rope_theta` (as in the published gpt-oss config), so both spellings carry the same values.
    """
    path = snapshot / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg["rope_parameters"])
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["mask_token_id"] = special_ids["mask_token_id"]
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    cfg["initial_context_length"] = rope["original_max_position_embeddings"]
    cfg["experts_per_token"] = hf_config.num_experts_per_tok
    cfg["architectures"] = ["GptOssForCausalLM"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build(out: Path | str = DEFAULT_OUT, cfg: TinyTeacherConfig = TinyTeacherConfig(),
          corpus_dir: Path | None = None, log=print) -> Path:
    """Train and save the tiny teacher to `out` (replacing what is there); returns `out`."""
    from pipeline.teacher import tokenizer as tokenizer_build
    import torch
    import transformers

    t0, cpu0 = time.monotonic(), time.process_time()
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())):
        raise UserError(f"{out} exists and is not a model snapshot; refusing to replace it")
    if cfg.steps < 1 or cfg.seq_len < 2 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1, --seq-len at least 2")
    out.parent.mkdir(parents=True, exist_ok=True)
    train_texts = _corpus_texts("train", corpus_dir, cfg.max_files)
    heldout_texts = _corpus_texts("heldout", corpus_dir, cfg.max_files)
    tok = tokenizer_build.train_bpe(train_texts, cfg.vocab_size)
    special_ids = tokenizer_build.special_token_ids(tok)
    sep = special_ids["pad_token_id"]  # <|endoftext|> separates documents, as in gpt-oss pretraining
    train_rows = pack_documents([e.ids for e in tok.encode_batch(train_texts)], sep, cfg.seq_len)
    eval_rows = pack_documents([e.ids for e in tok.encode_batch(heldout_texts)], sep, cfg.seq_len)
    eval_rows = eval_rows[: cfg.eval_sequences]
    if len(train_rows) == 0 or len(eval_rows) == 0:
        raise UserError(f"corpus too small for seq_len {cfg.seq_len}: {len(train_rows)} train / "
                        f"{len(eval_rows)} held-out sequences")
    log(f"tokenizer: {tok.get_vocab_size()} ids; {train_rows.size} train tokens, "
        f"{eval_rows.size} held-out tokens evaluated")

    hf_config = cfg.hf_config(special_ids)
    model, stats = train_model(cfg, hf_config, train_rows, log)
    ppl, usage = heldout_perplexity(model, eval_rows)
    uni = unigram_perplexity(train_rows, eval_rows, cfg.vocab_size)
    log(f"held-out perplexity {ppl:.2f} vs unigram baseline {uni:.2f}")
    # Only the default recipe on the built-in corpus has pinned hashes to reproduce.
    expected = sorted(KNOWN_WEIGHTS_SHA256) if cfg == TinyTeacherConfig() and corpus_dir is None else None

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    transformers.utils.logging.disable_progress_bar()
    # gpt-oss stops on <|return|>, <|endoftext|> and <|call|>; so does its miniature.
    model.generation_config.eos_token_id = [tok.token_to_id(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    model.save_pretrained(str(tmp), safe_serialization=True)
    _finish_config(tmp, hf_config, special_ids)
    tokenizer_build.save_tokenizer(tok, tmp, model_max_length=hf_config.max_position_embeddings)
    report = {
        "recipe_version": RECIPE_VERSION,
        "config": dataclasses.asdict(cfg),
        "corpus": str(corpus_dir) if corpus_dir else f"python stdlib {corpus.stdlib_root()}",
        "corpus_fingerprint": corpus.corpus_fingerprint("all", corpus_dir),
        "train_tokens": int(train_rows.size),
        "heldout_tokens_scored": int(eval_rows[:, 1:].size),
        "heldout_perplexity": ppl,
        "unigram_perplexity": uni,
        "expert_usage": usage,
        "weights_sha256": sha256_file(tmp / "model.safetensors"),
        "known_weights_sha256": expected,
        "cpu": _cpu_identity(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "build_seconds": round(time.monotonic() - t0, 1),
        "build_cpu_seconds": round(time.process_time() - cpu0, 1),  # ~ wall time on an idle machine
        **special_ids,
        **stats,
    }
    if expected is not None and report["weights_sha256"] not in expected:
        log(f"warning: weights sha256 {report['weights_sha256']} is none of the known builds of the "
            f"default recipe (torch {torch.__version__}, transformers {transformers.__version__}, "
            f"CPU {report['cpu']})")
    (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, trash)
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
    log(f"saved {out} in {report['build_seconds']}s")
    return out


def is_complete(snapshot: Path, recipe_version: int | None = RECIPE_VERSION) -> bool:
    """True when every snapshot file is present and the weights match the report's hash."""
    snapshot = Path(snapshot)
    if not all((snapshot / name).is_file() for name in SNAPSHOT_FILES):
        return False
    try:
        report = json.loads((snapshot / REPORT).read_text())
    except ValueError:
        return False
    # Older recipes are stale; a newer one (built by newer code) is kept rather than downgraded.
    if recipe_version is not None and report.get("recipe_version", 0) < recipe_version:
        return False
    return report.get("weights_sha256") == sha256_file(snapshot / "model.safetensors")


@contextlib.contextmanager
def _build_lock(out: Path):
    """Exclusive lock next to the snapshot; also clears what killed builders left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield


def ensure_tiny_teacher(out: Path | str | None = None, cfg: TinyTeacherConfig | None = None,
                        log=None) -> Path:
    """Return the tiny teacher's snapshot dir, building it first if missing, partial or stale.

    A file lock serialises builders: a second process waits, then finds the snapshot complete.
    """
    out = Path(out) if out is not None else DEFAULT_OUT
    if is_complete(out):
        return out
    with _build_lock(out):
        if not is_complete(out):
            log = log or (lambda msg: print(f"[tiny-teacher] {msg}", file=sys.stderr, flush=True))
            log(f"building the tiny GPT-OSS teacher at {out} (once; a few CPU minutes)")
            build(out, cfg or TinyTeacherConfig(), log=log)
    return out
