"""Speculative decoding with a DFlash draft against its target: losslessness, tau, speed.

    python -m tools.spec_decode --draft runs/demo/export --model tiny --prompts builtin
    python -m tools.spec_decode --draft <run>/export --model <snapshot> --prompts p.jsonl --naive

Prints a table and, last, one JSON line (keys: tau, lossless, ngram_tau, tokens_per_s,
ar_tokens_per_s, accept_hist, slot_accept, target_forwards_per_token, drafts, ...; with
--simulate also sim_tau and sim_matches: served equals offline).
Exit status 1 when a greedy run was not lossless.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def parse(argv=None):
    from pipeline.speculative.harness import SpecConfig

    ap = argparse.ArgumentParser(prog="python -m tools.spec_decode", description=__doc__.splitlines()[0])
    ap.add_argument("--draft", required=True, help="z-lab export dir of the draft (<run>/export)")
    ap.add_argument("--model", default="tiny", help="teacher: snapshot dir, HF cache repo id, or 'tiny'")
    ap.add_argument("--prompts", default="builtin",
                    help="'builtin' or a .jsonl with `prompt`, chat `messages` or `input_ids` per line")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None, help="verify block size (default: the draft's)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: rejection sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    ap.add_argument("--naive", action="store_true",
                    help="recompute-everything oracle (EasyDeL teacher + model.draft_hidden, no caches)")
    ap.add_argument("--stop-at-eos", action="store_true", help="end a prompt's output at EOS")
    ap.add_argument("--compare-draft", action="append", default=[], metavar="LABEL=DIR",
                    help="another draft export to run on the same prompts (repeatable)")
    ap.add_argument("--label", default="dflash", help="name of --draft in the table")
    ap.add_argument("--no-ngram", action="store_true", help="skip the n-gram prompt-lookup baseline")
    ap.add_argument("--simulate", action="store_true",
                    help="greedy: also print simulated tau (one training-form forward over each "
                         "greedy output, pipeline.speculative.simulate) and whether it matches, step for step")
    a = ap.parse_args(argv)
    extra = []
    for item in a.compare_draft:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--compare-draft wants LABEL=DIR, got {item!r}")
        extra.append((label, path))
    return SpecConfig(draft=a.draft, model=a.model, prompts=a.prompts, max_new_tokens=a.max_new_tokens,
                      block_size=a.block_size, temperature=a.temperature, seed=a.seed, naive=a.naive,
                      limit=a.limit, stop_at_eos=a.stop_at_eos, extra_drafts=tuple(extra),
                      ngram=not a.no_ngram, label=a.label,
                      simulate=a.simulate)


def main(argv=None) -> int:
    from model.io import CheckpointError

    try:
        cfg = parse(argv)
        from pipeline.speculative.harness import format_table, json_line, run
        report = run(cfg, log=lambda m: print(m, file=sys.stderr))
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(json_line(report))
    return 1 if report["lossless"] is False else 0


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
