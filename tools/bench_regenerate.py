"""Teacher regeneration throughput: generated tokens/s at batch 64 vs batch 1 (pipeline.speculative.generate).

    python -m tools.bench_regenerate --model tiny [--batch-sizes 1,64] [--new-tokens 128]

Prompts are the first --prompt-tokens tokens of held-out corpus files. No stop ids: every row
generates exactly --new-tokens tokens, so the count does not depend on where the teacher would
stop. Each batch size is compiled first (one warm-up call), then timed on --rounds batches;
tokens/s counts real rows only (the last batch's padding rows are not counted). The machine is
shared: repeat when the load average is high. Ends with `BENCH_JSON {...}`.
"""
from __future__ import annotations

import argparse
import json
import time

from tools._bench_common import machine


def main(argv=None) -> int:
    from pipeline.regen import prompts as rp
    from pipeline.speculative.generate import BatchGenerator, SamplingConfig
    from pipeline.teacher.snapshot import resolve_model
    from pipeline.data.prompts import load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m tools.bench_regenerate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="timed batches per batch size")
    a = ap.parse_args(argv)
    model = resolve_model(a.model)
    tok = load_tokenizer(model)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    need = max(sizes) * (a.rounds + 1) + 4
    records = rp.prompt_records("builtin:heldout", need)
    prompts = [rp.build_prompt(tok, i, r, a.prompt_tokens).ids for i, r in enumerate(records)]
    prompts = [prompts[i % len(prompts)] for i in range(need)]  # the split may hold fewer files
    result = {"model": str(model), "new_tokens": a.new_tokens, "prompt_tokens": a.prompt_tokens,
              "machine": machine(), "tokens_per_s": {}}
    for b in sizes:
        gen = BatchGenerator.from_snapshot(model, stop_ids=(), batch_size=b,
                                           sampling=SamplingConfig(max_new_tokens=a.new_tokens))
        gen.generate(prompts[:b], list(range(b)))  # compile
        work = prompts[b:b + max(b * a.rounds, 4)]  # batch 1: a few prompts, not one
        t0 = time.perf_counter()
        outs = gen.generate(work, list(range(len(work))))
        dt = time.perf_counter() - t0
        n = sum(len(o) for o in outs)
        result["tokens_per_s"][str(b)] = round(n / dt, 1)
        print(f"batch {b:4d}: {n} tokens in {dt:.2f} s = {n / dt:.1f} tokens/s", flush=True)
    tps = result["tokens_per_s"]
    if len(sizes) >= 2:
        result["speedup"] = round(tps[str(sizes[-1])] / tps[str(sizes[0])], 2)
        print(f"batch {sizes[-1]} / batch {sizes[0]}: {result['speedup']}x")
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
