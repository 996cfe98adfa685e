"""Teacher regeneration, resumable: prompts in, the teacher's answers out as dump-ready jsonl.

`run_regenerate(RegenerateConfig(...))` is what `python -m pipeline.regenerate` calls. Prompts are
taken in data order in chunks of `interval` (a multiple of batch_size, so every run forms the same
batches, hence computes the same floats); each chunk is generated, written to
`part-NNNNN.jsonl.tmp`, fsynced and renamed, and only then counted in the ledger
(`regenerate-ledger.json`, replaced atomically). After a SIGKILL at any instant the ledger names
only complete parts; a rerun deletes anything it does not name and continues with the next chunk,
so the finished directory is byte-identical to an uninterrupted run's. A rerun with different
settings (teacher, data, sampling, batching) is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import types
from pathlib import Path

from pipeline.errors import UserError
from pipeline.preempt import Preempted, StopOnSignal
from pipeline.speculative.generate import SamplingConfig
from pipeline.speculative.weights import resolve_dtype
from pipeline.cache.ledger import atomic_write_json, fsync_dir

LEDGER = "regenerate-ledger.json"
_PART = re.compile(r"part-\d{5,}\.jsonl")  # what _commit_part names a part
LEDGER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RegenerateConfig:
    """Settings of one regeneration; all but out/overwrite/progress are its identity."""
    model: str = "openai/gpt-oss-20b"  # HF snapshot dir, repo id in the local HF cache, or "tiny"
    data: str | None = None  # what the dump reads (jsonl/parquet/dir/glob/builtin:SPLIT)
    out: str = "/dev/shm/dflash/regenerated"
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = 256  # sequences decoded together (the largest compiled for v5e-8, docs/TPU.md)
    dtype: str = "auto"  # decoder weights/cache: bf16 on an accelerator, float32 on the CPU
    prompt_tokens: int = 128  # plain-text prompts: the first N tokens of each document
    max_prompts: int | None = None  # only the first N records of the data
    commit_every: int = 256  # prompts per committed part (rounded up to batch_size)
    overwrite: bool = False  # delete an earlier regeneration in `out` first
    progress: bool = True  # tqdm bar on stderr

    def validate(self) -> None:
        self.sampling.validate()
        for name in ("batch_size", "prompt_tokens", "commit_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserError(f"--max-prompts must be >= 1, got {self.max_prompts}")

    @property
    def interval(self) -> int:
        return math.ceil(self.commit_every / self.batch_size) * self.batch_size


def stop_ids(model_dir: Path, hf_cfg: dict, tokenizer, plain_text: bool) -> tuple[int, ...]:
    """EOS ids of generation_config.json (else config.json); for plain-text prompts also the
    document separator the teacher ends documents with (pipeline.data.sequences.DOC_SEPARATOR)."""
    from pipeline.data.sequences import DOC_SEPARATOR

    ids = hf_cfg.get("eos_token_id")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    ids = {int(i) for i in (ids if isinstance(ids, list) else [ids]) if i is not None}
    sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    if plain_text and sep is not None and sep != tokenizer.unk_token_id:
        ids.add(int(sep))
    if not ids:
        raise UserError(f"{model_dir}: no eos_token_id in generation_config.json or config.json")
    return tuple(sorted(ids))


def _settings(config: RegenerateConfig, model_dir: Path, stops) -> dict:
    from pipeline.dump.sources import teacher_info

    # seq_len 1: prompt lengths are checked per prompt (check_prompt_lengths), not as a window
    probe = types.SimpleNamespace(model=str(model_dir), data=config.data, seq_len=1)
    info = teacher_info(probe)
    return {"teacher": info.identity, "data": info.data_identity,
            "sampling": dataclasses.asdict(config.sampling), "batch_size": config.batch_size,
            "dtype": resolve_dtype(config.dtype),
            "prompt_tokens": config.prompt_tokens, "max_prompts": config.max_prompts,
            "interval": config.interval, "stop_ids": list(stops)}


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _prepare(out: Path, settings: dict, overwrite: bool) -> dict:
    """The ledger to continue from (fresh, or resumed after deleting what it does not name)."""
    path = out / LEDGER
    if out.exists() and overwrite and path.exists():
        shutil.rmtree(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.exists() and not path.exists() and any(not _ours(f.name) for f in out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no regeneration ({LEDGER}); "
                        "choose an empty or new directory")
    if not path.exists():
        if out.is_dir():
            for f in out.iterdir():  # an uncommitted first part
                f.unlink()
        return {"version": LEDGER_VERSION, "settings_key": _key(settings), "settings": settings,
                "parts": [], "prompts_done": 0, "complete": False}
    try:
        ledger = json.loads(path.read_text())
        key, parts = ledger["settings_key"], ledger["parts"]
        if not isinstance(parts, list):
            raise TypeError(f"parts is a {type(parts).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({e}); rerun with --overwrite to start over") from None
    if key != _key(settings):
        old = ledger.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise UserError(f"{out} was regenerated with other settings ({', '.join(diff)} differ); "
                        "rerun with the same flags to resume, or --overwrite to start over")
    for p in parts:  # names are joined to --out and the rest of --out is deleted: no ../x
        if not isinstance(p, dict) or not _PART.fullmatch(str(p.get("name"))):
            raise UserError(f"{path}: part {p!r} is not a part this command writes "
                            "(part-NNNNN.jsonl inside --out); the ledger is corrupted, rerun with "
                            "--overwrite to start over")
    named = {p["name"] for p in parts} | {LEDGER}
    for f in out.iterdir():  # a part being written when the run died, or its ledger's tmp file
        if f.name not in named:
            f.unlink()
    for p in parts:
        f = out / p["name"]
        if not f.is_file() or f.stat().st_size != p["bytes"]:
            raise UserError(f"{f}: missing or changed since it was committed; rerun with "
                            "--overwrite to start over")
    return ledger


def _ours(name: str) -> bool:
    """Files a regeneration writes (a run killed before its first commit leaves only these)."""
    return name.startswith(("part-", LEDGER)) and name.endswith((".jsonl", ".tmp"))


def _commit_part(out: Path, ledger: dict, lines: list[str], done: int) -> dict:
    try:
        return _write_part(out, ledger, lines, done)
    except OSError as e:  # a full disk, a read-only or vanished --out: one line, resumable
        with contextlib.suppress(OSError):
            (out / f"part-{len(ledger['parts']):05d}.jsonl.tmp").unlink(missing_ok=True)
        raise UserError(f"writing the next part in --out {out} failed ({e.strerror or e}); "
                        f"{ledger['prompts_done']} prompts are committed: fix it and rerun the "
                        "same command to resume") from None


def _write_part(out: Path, ledger: dict, lines: list[str], done: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    name = f"part-{len(ledger['parts']):05d}.jsonl"
    body = "".join(lines).encode()
    tmp = out / (name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / name)
    fsync_dir(out)
    part = {"name": name, "rows": len(lines), "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest()}
    ledger = dict(ledger, parts=ledger["parts"] + [part], prompts_done=done)
    atomic_write_json(out / LEDGER, ledger)
    return ledger


def run_regenerate(config: RegenerateConfig, *, log=print, stop_after_parts: int | None = None) -> dict:
    """Regenerate (or resume, or recognise as complete) into config.out; returns a summary.
    `stop_after_parts` (tests) returns after that many parts of this run, as a kill would."""
    from pipeline.regen import prompts as rp
    from pipeline.speculative.generate import BatchGenerator
    from pipeline.teacher.snapshot import read_config, resolve_model
    from pipeline.data.limits import teacher_positions
    from pipeline.data.prompts import load_tokenizer

    config.validate()
    t0 = time.perf_counter()
    model_dir = Path(resolve_model(config.model)).resolve()
    hf_cfg = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    records = rp.prompt_records(config.data, config.max_prompts)
    plain = any(kind not in ("chat", "chat_ids") for _, kind, _ in records)
    stops = stop_ids(model_dir, hf_cfg, tokenizer, plain)
    rp.check_prompt_lengths(tokenizer, records, config.prompt_tokens,
                            config.sampling.max_new_tokens, teacher_positions(hf_cfg))
    settings = _settings(config, model_dir, stops)
    out = Path(config.out)
    ledger = _prepare(out, settings, config.overwrite)
    start = ledger["prompts_done"]
    if ledger["complete"]:
        log(f"{out} is already complete ({start} prompts); nothing to do")
        return _summary(out, ledger, 0, 0, t0)
    if start:
        log(f"resuming the regeneration in {out} after {start} committed prompts")
    prompts = rp.iter_prompts(tokenizer, records, config.prompt_tokens, start)
    first = next(prompts, None)  # the first prompt renders before any file is written
    gen = BatchGenerator.from_snapshot(model_dir, stop_ids=stops, sampling=config.sampling,
                                       batch_size=config.batch_size, dtype=config.dtype)
    bar = _progress(config.progress, len(records), start)
    new_tokens, parts = 0, 0
    pending = [first] if first is not None else []
    stop = StopOnSignal().__enter__()  # SIGTERM: stop after the part being written
    try:
        while pending:
            pending += [p for _, p in zip(range(config.interval - len(pending)), prompts)]
            outs = gen.generate([p.ids for p in pending], [p.index for p in pending])
            lines = [json.dumps(rp.output_record(tokenizer, p, o, stops), ensure_ascii=False) + "\n"
                     for p, o in zip(pending, outs)]
            ledger = _commit_part(out, ledger, lines, pending[-1].index + 1)
            new_tokens += sum(len(o) for o in outs)
            bar.update(len(pending))
            parts += 1
            pending = [p for _, p in zip(range(1), prompts)]
            if stop_after_parts is not None and parts >= stop_after_parts and pending:
                return _summary(out, ledger, new_tokens, parts, t0)
            if stop.requested is not None and pending:
                raise Preempted(f"stopped by SIGTERM; {ledger['prompts_done']} prompts committed "
                                f"in {out}; rerun the same command to resume")
    finally:
        stop.__exit__(None, None, None)
        bar.close()
    ledger = dict(ledger, complete=True)
    atomic_write_json(out / LEDGER, ledger)
    return _summary(out, ledger, new_tokens, parts, t0)


def _progress(enabled: bool, total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="prompt", disable=not enabled, dynamic_ncols=True)


def _summary(out: Path, ledger: dict, new_tokens: int, parts: int, t0: float) -> dict:
    seconds = time.perf_counter() - t0
    return {"out": str(out.resolve()), "prompts": ledger["prompts_done"],
            "parts": len(ledger["parts"]), "parts_this_run": parts,
            "generated_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
            "complete": ledger["complete"]}
