"""DFlash2 drafts in the speculative decoder (pipeline.speculative.loop through CachedDraft's
selector path) and in simulated tau, on the session's tiny GPT-OSS target (tests/conftest.py).

The draft: the session's trained DFlash draft as backbone, with DFlash2 additions whose
convolutions and selector codebooks are moved away from init, so the selector's path differs
from the unary argmax. Oracles: the target's own greedy AR decode (lossless), the target's
softmax (sampling, chi-square), the decoder's accepted lengths (simulated == served, step for
step) and the reference `dflash_generate` walking `DFlash2DraftModel.propose` (.venv-ref).
"""
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.config import DFlash2Config
from model.dflash2 import init_additions
from pipeline.speculative import loop as sp
from pipeline.speculative.draft import CachedDraft
from pipeline.speculative.harness import simulated_steps
from pipeline.speculative.target import CachedTarget
from tests import _spec_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def art(spec_artifacts):
    return spec_artifacts


@pytest.fixture(scope="module")
def target(art):
    return CachedTarget(art["target"], LAYERS)


@pytest.fixture(scope="module")
def draft2(art, tmp_path_factory):
    config, params = model.load_draft(art["trained"], dtype=jnp.float32)
    config = dataclasses.replace(config, dflash2=DFlash2Config(selector_rank=16, selector_top_k=8))
    params = init_additions(config, jax.random.key(3), params)
    rng = np.random.default_rng(4)
    sel = params["candidate_selector"]
    for name in ("predecessor_codebook", "successor_codebook"):  # the bilinear term ~ +-1:
        sel[name] = jnp.asarray(0.4 * rng.normal(size=sel[name].shape), jnp.float32)  # reorders
    sel["hidden_projection"]["kernel"] = jnp.asarray(
        0.3 * rng.normal(size=sel["hidden_projection"]["kernel"].shape), jnp.float32)
    for layer in params["layers"]:  # small dynamic taps: the draft still accepts tokens
        for conv in ("attention_conv", "mlp_conv"):
            k = layer[conv]["kernel_projection"]["kernel"]
            layer[conv]["kernel_projection"]["kernel"] = jnp.asarray(
                0.02 * rng.normal(size=k.shape), jnp.float32)
    out = tmp_path_factory.mktemp("dflash2") / "draft"
    model.save_draft(out, config, params)
    return out


def _spec(target, draft_dir, prompt, new, temperature=0.0, seed=0, draft=None):
    shape = model.load_config(draft_dir)
    draft = draft or CachedDraft(draft_dir, target.params["embed"], target.params["lm_head"])
    return sp.speculative_generate(
        target, sp.DFlashProposer(draft, shape.block_size, shape.mask_token_id), prompt,
        max_new_tokens=new, block_size=shape.block_size, mask_token_id=shape.mask_token_id,
        temperature=temperature, rng=np.random.default_rng(seed))


def test_greedy_lossless_and_simulated_equals_served(art, target, draft2):
    """Output == plain greedy AR; simulated tau's steps == the decoder's, per prompt; the
    selector's path is not the backbone's argmax (the DFlash draft decodes other steps)."""
    prompts = fx.random_prompts(3, seed=11) + fx.random_prompts(3, (4, 12), seed=5)
    gens, ars, plain = [], [], []
    for p in prompts:
        ars.append(sp.ar_generate(target, p, max_new_tokens=37))
        gens.append(_spec(target, draft2, p, 37))
        plain.append(_spec(target, art["trained"], p, 37))
        assert gens[-1].tokens == ars[-1].tokens
    steps = simulated_steps(draft2, model.load_config(draft2).block_size, target,
                            target.params["embed"], target.params["lm_head"], prompts, ars)
    assert steps == [g.accept_lengths for g in gens]
    assert any(x >= 3 for g in gens for x in g.accept_lengths)  # acceptance is exercised
    assert [g.accept_lengths for g in gens] != [g.accept_lengths for g in plain]


@pytest.mark.slow
def test_greedy_matches_reference_dflash_generate(art, target, draft2):
    """dflash.model.dflash_generate with DFlash2DraftModel loaded from our export (HF torch
    target, .venv-ref) and our decoder: the same outputs and accepted-length sequences."""
    ref_py = ROOT / ".venv-ref" / "bin" / "python"
    assert ref_py.exists(), "reference env missing: run `make ref-venv` (creates .venv-ref)"
    prompts = fx.random_prompts(3, (4, 12), seed=5) + fx.random_prompts(1, seed=11)
    pfile = draft2.parent / "prompts.jsonl"
    pfile.write_text("\n".join(json.dumps({"input_ids": p}) for p in prompts))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    res = subprocess.run([str(ref_py), str(ROOT / "tools" / "ref_generate.py"), "--model",
                          str(art["target"]), "--draft", str(draft2), "--prompts", str(pfile),
                          "--max-new-tokens", "30"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = json.loads(res.stdout.strip().splitlines()[-1])
    ours = [_spec(target, draft2, p, 30) for p in prompts]
    assert [g.tokens for g in ours] == ref["outputs"]
    assert [g.accept_lengths for g in ours] == ref["acceptance_lengths"]
    assert max(max(a) for a in ref["acceptance_lengths"]) >= 3


@pytest.mark.slow
def test_sampling_matches_target_softmax(art, target, draft2):
    """T > 0, q over the K candidates: token 2 (the first drawn by rejection sampling) follows
    the target's softmax at its prefix (HF torch), as in the DFlash sampling test. The prompt is
    one the backbone was trained on, at T = 0.1: the draft's token is then accepted in some runs
    and rejected (the residual resampled) in others, so both branches are exercised."""
    import torch
    from scipy.stats import chisquare
    from transformers import GptOssForCausalLM

    temp, runs = 0.1, 300
    hf = GptOssForCausalLM.from_pretrained(art["target"], dtype=torch.float32).eval()

    def probs(ids):
        with torch.no_grad():
            return torch.softmax(hf(torch.tensor([ids])).logits[0, -1].double() / temp, -1).numpy()

    prompt = fx.random_prompts(4, (4, 12), seed=5)[0]  # fx.train_draft's first sequence
    mode = int(np.argmax(probs(prompt)))
    p = probs(prompt + [mode])
    draft = CachedDraft(draft2, target.params["embed"], target.params["lm_head"])
    counts, n, accepted = np.zeros_like(p), 0, 0
    for seed in range(runs):
        g = _spec(target, draft2, prompt, 2, temperature=temp, seed=seed, draft=draft)
        if g.tokens[0] == mode:
            counts[g.tokens[1]] += 1
            n += 1
            accepted += g.accepted[0] > 0
    assert n > 60 and 0 < accepted < n
    big = p * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    assert chisquare(obs, exp).pvalue > 1e-3
