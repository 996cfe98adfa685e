"""The speculative-decoding harness: run a draft against its target on prompts and report.

Library behind `python -m tools.spec_decode`. Per prompt it runs plain AR decoding (the greedy
reference output and the AR speed), DFlash speculative decoding with each draft, and the n-gram
prompt-lookup baseline with the same block size; then it reports mean tau, the histogram of
accepted lengths, per-slot acceptance, target forwards per token, tokens/s, and `lossless`
(every greedy speculative output equals the AR output token for token).

`simulate` (greedy only) also replays each DFlash draft offline on the AR outputs
(`pipeline.speculative.simulate`: one training-form forward over prompt + output, features from one
full-sequence forward of the same target): `sim_tau` next to `tau`, and `sim_matches` = every
prompt's simulated accepted lengths equal the decoded ones, step for step. A mismatch means the
served draft is not the trained one (a dropped config field, a position offset, a wrong layer),
or an argmax tie broken differently by the two forms' float rounding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.speculative import loop as sp
from pipeline.errors import UserError


@dataclass(frozen=True)
class SpecConfig:
    draft: str  # z-lab export dir of the draft (e.g. <run>/export)
    model: str = "tiny"  # teacher: HF snapshot dir, cached repo id, or "tiny"
    prompts: str = "builtin"  # "builtin" or a .jsonl file (prompt / messages / input_ids)
    max_new_tokens: int = 64
    block_size: int | None = None  # default: the draft's
    temperature: float = 0.0  # > 0: rejection sampling (then `lossless` is not defined)
    seed: int = 0
    naive: bool = False  # recompute-everything oracle (EasyDeL Teacher + model.draft_hidden)
    limit: int | None = None  # use only the first N prompts
    stop_at_eos: bool = False  # stop a prompt at the tokenizer's EOS (off: fixed-length outputs)
    extra_drafts: tuple = ()  # ((label, export dir), ...) compared on the same prompts
    ngram: bool = True  # also run the n-gram prompt-lookup baseline
    label: str = "dflash"  # name of the main draft in the table and report["drafts"]
    simulate: bool = False  # also report simulated tau (pipeline.speculative.simulate) per DFlash draft


def build_target(model_dir: Path, layer_ids, naive: bool):
    """(target adapter, embedding [V, H], lm_head [V, H])."""
    from pipeline.speculative.target import CachedTarget

    if not naive:
        import numpy as np

        t = CachedTarget(model_dir, layer_ids)
        # host float32 copies: the draft runs on one device in float32, the target may be bf16
        # and sharded over many
        return t, np.asarray(t.params["embed"], np.float32), np.asarray(t.params["lm_head"], np.float32)
    import jax.numpy as jnp
    from pipeline.speculative.naive import NaiveTarget
    from pipeline.teacher.easydel_teacher import Teacher

    teacher = Teacher.from_pretrained(str(model_dir), dtype=jnp.float32)
    return NaiveTarget(teacher, layer_ids), teacher.embedding, teacher.lm_head


def build_draft(export: str, embedding, lm_head, naive: bool):
    if naive:
        from pipeline.speculative.naive import NaiveDraft
        return NaiveDraft(export, embedding, lm_head)
    from pipeline.speculative.draft import CachedDraft
    return CachedDraft(export, embedding, lm_head)


def check_fits(path, d, teacher) -> None:
    """Refuse a draft (DraftConfig d) built for another teacher. The draft reads the teacher's
    features, embedding and LM head, so any mismatch would still decode "losslessly" (the teacher
    verifies every token) while measuring nothing; jnp indexing would also silently clamp bad
    layer/token ids."""
    layers, ids = int(teacher.num_hidden_layers), d.target_layer_ids
    problems = [f"{name} {mine} but the teacher's is {theirs}" for name, mine, theirs in (
        ("hidden_size", d.hidden_size, teacher.hidden_size),
        ("vocab_size", d.vocab_size, teacher.vocab_size),
        ("num_target_layers", d.num_target_layers, layers)) if mine != theirs]
    if any(not 0 <= i < layers for i in ids):
        problems.append(f"target_layer_ids {list(ids)} outside the teacher's layers 0..{layers - 1}")
    if len(set(ids)) != len(ids):
        problems.append(f"target_layer_ids {list(ids)} repeat a layer")
    if not 0 <= d.mask_token_id < teacher.vocab_size:
        problems.append(f"mask_token_id {d.mask_token_id} outside the teacher's vocabulary "
                        f"(0..{teacher.vocab_size - 1})")
    if problems:
        raise UserError(f"draft {path} does not fit the teacher: " + "; ".join(problems))


def summarize(gens: list, block_size: int) -> dict:
    """tau, histogram of accepted lengths, per-slot acceptance, forwards/token, tokens/s."""
    lengths = [x for g in gens for x in g.accept_lengths]
    new = sum(len(g.tokens) for g in gens)
    hist = np.bincount(np.asarray(lengths, np.int64), minlength=block_size + 1)[1 : block_size + 1]
    slot = []
    for k in range(1, block_size):  # P(draft token k accepted), over steps that proposed >= k
        steps = [(a, p) for g in gens for a, p in zip(g.accepted, g.proposed) if p >= k]
        slot.append(round(sum(a >= k for a, _ in steps) / len(steps), 4) if steps else None)
    secs = sum(g.seconds for g in gens)
    return {"tau": round(float(np.mean(lengths)), 4) if lengths else None,
            "accept_hist": hist.tolist(), "slot_accept": slot,
            "target_forwards_per_token": round(sum(g.target_forwards for g in gens) / max(new, 1), 4),
            "tokens_per_s": round(new / secs, 2) if secs else None, "new_tokens": new}


def run(cfg: SpecConfig, log=print) -> dict:
    """Run the harness; returns the report dict (what the JSON line prints)."""
    import model
    from pipeline.data.prompts import load_prompts, load_tokenizer

    if cfg.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if cfg.temperature < 0:
        raise UserError("--temperature must be >= 0")
    from pipeline.teacher.snapshot import resolve_model
    from pipeline.speculative.target import load_hf_config

    model_dir = Path(resolve_model(cfg.model))
    teacher = load_hf_config(model_dir)
    shape = model.load_config(cfg.draft)
    block = cfg.block_size or shape.block_size
    if block < 1:
        raise UserError("--block-size must be >= 1")
    drafts = [(cfg.label, cfg.draft)] + list(cfg.extra_drafts)
    if len({d[0] for d in drafts} | {"ngram"}) != len(drafts) + 1:
        raise UserError("draft labels must be distinct and not 'ngram'")
    for _, path in drafts:  # every input is checked before the (slow) teacher load
        other = model.load_config(path)
        check_fits(path, other, teacher)
        model.load_draft(path)  # every tensor's name and shape, and readable files
        if other.target_layer_ids != shape.target_layer_ids:
            raise UserError(f"draft {path} reads target layers {other.target_layer_ids}, "
                            f"but {cfg.draft} reads {shape.target_layer_ids}")
    has_tok = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(model_dir) if has_tok else None  # id-only jsonl prompts need none
    from pipeline.data.limits import teacher_positions
    prompts = load_prompts(cfg.prompts, tok, limit=cfg.limit, vocab_size=teacher.vocab_size,
                           positions=teacher_positions(teacher), max_new_tokens=cfg.max_new_tokens)
    target, embedding, lm_head = build_target(model_dir, shape.target_layer_ids, cfg.naive)
    proposers = {label: sp.DFlashProposer(build_draft(path, embedding, lm_head, cfg.naive), block,
                                          shape.mask_token_id) for label, path in drafts}
    if cfg.ngram:
        proposers["ngram"] = sp.NgramProposer()
    stop = (tok.eos_token_id,) if cfg.stop_at_eos and tok is not None and tok.eos_token_id is not None else ()
    from pipeline.speculative.target import bucket

    # one cache size for all prompts, and a warm-up per prefill bucket, so that jit compiles
    # before the clock runs and tokens/s measures decoding, not compilation
    capacity = bucket(max(len(p) for p in prompts), 64) + cfg.max_new_tokens + 2 * block
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=stop,
              capacity=capacity)

    def spec(label, prompt, seed, max_new=None):
        return sp.speculative_generate(target, proposers[label], prompt, block_size=block,
                                       mask_token_id=shape.mask_token_id,
                                       rng=np.random.default_rng(seed),
                                       **{**kw, "max_new_tokens": max_new or cfg.max_new_tokens})

    for prompt in {bucket(len(p), 64): p for p in prompts}.values():
        sp.ar_generate(target, prompt, rng=np.random.default_rng(0), **{**kw, "max_new_tokens": 2})
        for label in proposers:
            spec(label, prompt, 0, max_new=block + 2)
    ar, results = [], {label: [] for label in proposers}
    for i, prompt in enumerate(prompts):
        ar.append(sp.ar_generate(target, prompt, rng=np.random.default_rng(cfg.seed + i), **kw))
        for label in proposers:
            results[label].append(spec(label, prompt, cfg.seed + i))
        log(f"prompt {i + 1}/{len(prompts)}: {len(prompt)} tokens, tau "
            + ", ".join(f"{k} {np.mean(v[-1].accept_lengths or [0]):.2f}" for k, v in results.items()))
    greedy = cfg.temperature == 0
    per = {}
    for label, gens in results.items():
        per[label] = summarize(gens, block)
        per[label]["lossless"] = all(g.tokens == a.tokens for g, a in zip(gens, ar)) if greedy else None
    if cfg.simulate and greedy:
        for label, path in drafts:
            sims = simulated_steps(path, block, target, embedding, lm_head, prompts, ar)
            lengths = [x for steps in sims for x in steps]
            per[label]["sim_tau"] = round(float(np.mean(lengths)), 4) if lengths else None
            per[label]["sim_matches"] = all(
                steps == g.accept_lengths for steps, g in zip(sims, results[label]))
    main = per[cfg.label]
    ar_secs = sum(g.seconds for g in ar)
    return {"tau": main["tau"], "lossless": main["lossless"] if greedy else None,
            "ngram_tau": per["ngram"]["tau"] if "ngram" in per else None,
            "tokens_per_s": main["tokens_per_s"],
            "ar_tokens_per_s": round(sum(len(g.tokens) for g in ar) / ar_secs, 2) if ar_secs else None,
            "accept_hist": main["accept_hist"], "slot_accept": main["slot_accept"],
            "target_forwards_per_token": main["target_forwards_per_token"],
            "all_lossless": all(v["lossless"] for v in per.values()) if greedy else None,
            "block_size": block, "temperature": cfg.temperature, "prompts": len(prompts),
            "max_new_tokens": cfg.max_new_tokens, "mode": "naive" if cfg.naive else "cached",
            "sim_tau": main.get("sim_tau"), "sim_matches": main.get("sim_matches"),
            "drafts": per}


def simulated_steps(export, block: int, target, embedding, lm_head, prompts, ar) -> list:
    """Per prompt, the accepted lengths `pipeline.speculative.simulate` predicts for the draft at `export`
    on prompt + its greedy AR output (the generated region is the output)."""
    import dataclasses

    import jax.numpy as jnp

    from model.io import load_draft
    from pipeline.speculative.simulate import simulate_sequence
    from pipeline.speculative.target import bucket

    config, params = load_draft(export, dtype=jnp.float32)
    config = dataclasses.replace(config, block_size=block)
    out = []
    for prompt, gen in zip(prompts, ar):
        ids = np.asarray(list(prompt) + list(gen.tokens), np.int32)
        pad = bucket(len(ids), 64)
        target.reset(pad)
        _, feats = target.run(ids, 0, len(ids), pad)
        mask = np.zeros(len(ids), np.uint8)
        mask[len(prompt):] = 1
        out.append(simulate_sequence(config, params, embedding, lm_head, ids, mask,
                                     np.asarray(feats, np.float32), pad_to=pad))
    return out


def format_table(report: dict) -> str:
    """Human table: one row per proposer (drafts, n-gram) plus plain AR."""
    sim = report.get("sim_tau") is not None
    rows = [("proposer", "tau") + (("simulated tau",) if sim else ())
            + ("fwd/token", "tokens/s", "lossless", "accepted-length histogram")]
    for label, r in report["drafts"].items():
        sim_cell = (("-" if r.get("sim_tau") is None else
                     f"{r['sim_tau']:.3f}" + ("" if r["sim_matches"] else " (differs)"),) if sim else ())
        rows.append((label, f"{r['tau']:.3f}") + sim_cell
                    + (f"{r['target_forwards_per_token']:.3f}", f"{r['tokens_per_s']}",
                       str(r["lossless"]), " ".join(map(str, r["accept_hist"]))))
    rows.append(("AR (target only)", "1.000") + (("-",) if sim else ())
                + ("1.000", f"{report['ar_tokens_per_s']}", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    slot = report["slot_accept"]
    lines.append(f"per-slot acceptance ({next(iter(report['drafts']))}, slot 1..B-1): "
                 + " ".join("-" if s is None else f"{s:.2f}" for s in slot))
    return "\n".join(lines)


def json_line(report: dict) -> str:
    return json.dumps(report, sort_keys=True)
