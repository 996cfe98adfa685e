"""Reference run: `dflash.model.dflash_generate` with HF torch GPT-OSS + a z-lab draft export.

Runs in the separate reference environment (transformers 5.15, which dflash_generate needs):

    .venv-ref/bin/python tools/ref_generate.py --model <snapshot> --draft <export> \
        --prompts prompts.jsonl --max-new-tokens 32 [--block-size N]

prompts.jsonl: one {"input_ids": [...]} per line. Prints one JSON object:
{"outputs": [[new token ids], ...], "acceptance_lengths": [[...], ...]}.
Deliberately standalone (no project imports): it is the independent oracle of the parity test.
"""
import argparse
import json
from pathlib import Path
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=None)
    a = ap.parse_args(argv)

    import torch
    import dflash.model as ref
    from transformers import AutoModelForCausalLM

    # dflash_generate times with torch.cuda.synchronize(); on a CPU-only torch use a plain clock.
    ref._cuda_time = time.perf_counter
    target = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    archs = json.loads((Path(a.draft) / "config.json").read_text()).get("architectures") or []
    cls = ref.DFlash2DraftModel if "DFlash2DraftModel" in archs else ref.DFlashDraftModel
    draft = cls.from_pretrained(a.draft, dtype=torch.float32).eval()
    outputs, lengths = [], []
    with open(a.prompts) as f:
        prompts = [json.loads(line)["input_ids"] for line in f if line.strip()]
    for ids in prompts:
        res = ref.dflash_generate(draft, target, torch.tensor([ids]), a.max_new_tokens, None,
                                  temperature=0.0, block_size=a.block_size, return_stats=True)
        outputs.append(res.output_ids[0, len(ids):].tolist())
        lengths.append([int(x) for x in res.acceptance_lengths])
    print(json.dumps({"outputs": outputs, "acceptance_lengths": lengths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
