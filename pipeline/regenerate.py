"""Regenerate training data with the teacher (self-distillation): prompts in, the teacher's answers
out, as jsonl the dump reads directly.

    python -m pipeline.regenerate --model tiny --data builtin:train --out /dev/shm/dflash/regen \\
        --max-prompts 2000 --max-new-tokens 192
    python -m pipeline.regenerate --model openai/gpt-oss-20b --data chats.jsonl --out regen/ \\
        --temperature 0.7 --top-p 0.95 --seed 1 --max-new-tokens 2048
    python -m pipeline.teacher_dump --model tiny --data /dev/shm/dflash/regen --out cache/ ...

Chat prompts (`messages`): the turns before the first assistant turn go through the teacher's
chat template and the teacher writes the assistant turn; the output row is {"messages": [...]},
so the dump's assistant-only loss mask covers the generated tokens. Plain text (`text`, the
builtin corpus, .py/.txt files) is continued from its first --prompt-tokens tokens; the output
row is {"prompt", "completion"} and the dump supervises the completion only. Generation stops at
the teacher's EOS ids (generation_config.json) or --max-new-tokens.
Rerun the same command after an interruption to resume; the result is byte-identical to an
uninterrupted run. Prints one JSON line at the end.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import run_resumable_cli
from pipeline.speculative.generate import SamplingConfig
from pipeline.regen.run import RegenerateConfig, run_regenerate

_D, _S = RegenerateConfig(), SamplingConfig()


def parse_args(argv=None) -> RegenerateConfig:
    p = argparse.ArgumentParser(prog="python -m pipeline.regenerate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    dflt = " (default %(default)s)"
    add = p.add_argument
    add("--model", default=_D.model, help="HF snapshot dir, repo id in the local HF cache, or 'tiny'" + dflt)
    add("--data", default=None, help="prompts: .jsonl/.parquet (messages or text), dir, glob, saved "
        "dataset, text files, builtin:train / builtin:heldout (default: builtin:train)")
    add("--out", default=_D.out, help="output directory" + dflt)
    add("--max-new-tokens", type=int, default=_S.max_new_tokens, help="per prompt" + dflt)
    add("--temperature", type=float, default=_S.temperature, help="0 = greedy" + dflt)
    add("--top-p", type=float, default=_S.top_p, help="nucleus sampling mass" + dflt)
    add("--seed", type=int, default=_S.seed, help="sampling seed (per sequence index)" + dflt)
    add("--batch-size", type=int, default=_D.batch_size, help="sequences decoded together" + dflt)
    add("--dtype", default=_D.dtype, choices=("auto", "bfloat16", "float32"),
        help="teacher weights and KV cache: auto = bfloat16 on TPU/GPU, float32 on the CPU; the "
        "decoder is sharded over every accelerator (pipeline/speculative/weights.py)" + dflt)
    add("--prompt-tokens", type=int, default=_D.prompt_tokens,
        help="plain-text prompts: the first N tokens of each document" + dflt)
    add("--max-prompts", type=int, default=None, help="only the first N records of --data")
    add("--commit-every", type=int, default=_D.commit_every,
        help="prompts per committed part: the most work a crash loses" + dflt)
    add("--overwrite", action="store_true", help="delete an earlier regeneration in --out first")
    add("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              top_p=a.top_p, seed=a.seed)
    return RegenerateConfig(model=a.model, data=a.data or "builtin:train", out=a.out,
                            sampling=sampling, batch_size=a.batch_size, dtype=a.dtype,
                            prompt_tokens=a.prompt_tokens, max_prompts=a.max_prompts,
                            commit_every=a.commit_every, overwrite=a.overwrite,
                            progress=not a.no_progress)


def main(argv=None) -> int:
    return run_resumable_cli(
        lambda: run_regenerate(parse_args(argv), log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
