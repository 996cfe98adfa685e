"""Speculative decoding end to end on a small random GPT-OSS (HF checkpoint) and its drafts.

Oracles: HF torch GptOssForCausalLM (cached target), the reference DFlashDraftModel (cached
draft), our AR decode (lossless), the recompute-everything EasyDeL Teacher + model.draft_hidden
(cached == naive), the target's softmax (sampling), dflash_generate in .venv-ref (parity).
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.speculative import loop as sp
from model import load_config
from pipeline.speculative.draft import CachedDraft
from pipeline.speculative.target import CachedTarget
from tests import _spec_fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def art(spec_artifacts):
    return spec_artifacts  # one target and trained draft for the session (tests/conftest.py)


@pytest.fixture(scope="module")
def target(art):
    return CachedTarget(art["target"], LAYERS)


def _spec(target, draft_dir, prompt, new=24, temperature=0.0, seed=0, draft=None):
    shape = load_config(draft_dir)
    draft = draft or CachedDraft(draft_dir, target.params["embed"], target.params["lm_head"])
    return sp.speculative_generate(
        target, sp.DFlashProposer(draft, shape.block_size, shape.mask_token_id), prompt,
        max_new_tokens=new, block_size=shape.block_size, mask_token_id=shape.mask_token_id,
        temperature=temperature, rng=np.random.default_rng(seed))


def test_cached_target_matches_hf_torch(art, target):
    import torch
    from transformers import GptOssForCausalLM

    hf = GptOssForCausalLM.from_pretrained(art["target"], dtype=torch.float32).eval()
    ids = fx.random_prompts(1, (30, 31), seed=3)[0]  # > sliding window (6): window masks matter
    with torch.no_grad():
        o = hf(torch.tensor([ids]), output_hidden_states=True)
    target.reset(64)
    l1, f1 = target.run(np.asarray(ids[:17]), 0, 17, 32)  # padded prefill, then two extends
    l2, f2 = target.run(np.asarray(ids[17:21]), 17, 4, 4)
    l3, f3 = target.run(np.asarray(ids[21:]), 21, 9, 16)
    logits = np.concatenate([l1, l2, l3])
    feats = np.concatenate([np.asarray(f) for f in (f1, f2, f3)])
    ref_logits = o.logits[0].numpy()
    ref_feats = torch.cat([o.hidden_states[i + 1] for i in LAYERS], -1)[0].numpy()
    assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert np.abs(feats - ref_feats).max() <= 1e-4 * np.abs(ref_feats).max()


def test_cached_draft_matches_reference_forward(art):
    """The harness's CachedDraft: context appended in two padded chunks (its own extend), full
    and tail blocks through the module's cached propose, vs DFlashDraftModel."""
    import jax.numpy as jnp
    import torch
    from dflash.model import DFlashDraftModel

    ref = DFlashDraftModel.from_pretrained(art["untrained"], dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    ctx = rng.normal(size=(13, 3 * 64)).astype(np.float32)
    noise = rng.normal(size=(4, 64)).astype(np.float32)
    d = CachedDraft(art["untrained"], np.zeros((fx.VOCAB, 64), np.float32),
                    np.zeros((fx.VOCAB, 64), np.float32))
    d.reset(64)
    d.extend(ctx[:9])  # padded to 16 rows; the next append at 9 overwrites the padding
    d.extend(ctx[9:])
    assert d.ctx_len == 13
    for n in (4, 3, 2):
        with torch.no_grad():
            want = ref(position_ids=torch.arange(13 + n)[None], noise_embedding=torch.tensor(noise[None, :n]),
                       target_hidden=torch.tensor(ctx[None])).numpy()[0]
        got = np.asarray(d.module.apply(d.variables, d.cache, jnp.asarray(noise)[None], jnp.int32(13),
                                        jnp.int32(n), method="propose"))[0, :n]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_lossless_greedy(art, target, which):
    """Speculative output == the target's own greedy AR output, token for token."""
    prompts = fx.random_prompts(3, seed=11) + fx.random_prompts(2, (4, 12), seed=5)  # new + trained-on
    taus = []
    for prompt in prompts:
        ar = sp.ar_generate(target, prompt, max_new_tokens=40)
        g = _spec(target, art[which], prompt, new=40)
        assert g.tokens == ar.tokens
        assert len(g.tokens) == 40 and sum(g.accept_lengths) == 39
        taus.append(np.mean(g.accept_lengths))
    if which == "trained":  # acceptance paths are really exercised
        assert max(taus) > 2.0


@pytest.mark.slow
def test_sampling_matches_target_softmax(art, target):
    """T > 0: the first token drawn by rejection sampling (token 2; token 1 comes from prefill)
    follows the target's softmax (HF torch) at that prefix. The random target is flat, so a low
    temperature and the most peaked of 60 prompts; runs are conditioned on the modal token 1."""
    import torch
    from scipy.stats import chisquare
    from transformers import GptOssForCausalLM

    temp, runs = 0.3, 300
    hf = GptOssForCausalLM.from_pretrained(art["target"], dtype=torch.float32).eval()

    def probs(ids):
        with torch.no_grad():
            return torch.softmax(hf(torch.tensor([ids])).logits[0, -1].double() / temp, -1).numpy()

    prompt = max(fx.random_prompts(60, (4, 12), seed=21), key=lambda pr: probs(pr).max())
    mode = int(np.argmax(probs(prompt)))
    p = probs(prompt + [mode])
    draft = CachedDraft(art["trained"], target.params["embed"], target.params["lm_head"])
    counts, n = np.zeros_like(p), 0
    for seed in range(runs):
        g = _spec(target, art["trained"], prompt, new=2, temperature=temp, seed=seed, draft=draft)
        if g.tokens[0] == mode:
            counts[g.tokens[1]] += 1
            n += 1
    assert n > 60
    big = p * n >= 5  # merge rare tokens into one bin for the chi-square
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    assert chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.slow
def test_cached_equals_naive(art, target):
    """Cached target+draft == recompute-everything EasyDeL Teacher + model.draft_hidden: same
    tokens and the same accepted-length sequence (and both equal the Teacher's own AR decode)."""
    import jax.numpy as jnp

    from pipeline.speculative.naive import NaiveDraft, NaiveTarget
    from pipeline.teacher.easydel_teacher import Teacher

    teacher = Teacher.from_pretrained(str(art["target"]), dtype=jnp.float32)
    naive_t = NaiveTarget(teacher, LAYERS)
    prompt = fx.random_prompts(1, (4, 12), seed=5)[0]  # prompt + output fit one 32-token bucket
    cached = _spec(target, art["trained"], prompt, new=16)
    naive = _spec(naive_t, art["trained"], prompt, new=16,
                  draft=NaiveDraft(art["trained"], teacher.embedding, teacher.lm_head))
    assert naive.tokens == cached.tokens
    assert naive.accept_lengths == cached.accept_lengths
    assert sp.ar_generate(naive_t, prompt, max_new_tokens=16).tokens == cached.tokens
    assert np.mean(cached.accept_lengths) > 1.5  # the acceptance path is exercised


@pytest.mark.slow
def test_parity_with_reference_dflash_generate(art, target):
    """dflash.model.dflash_generate (HF torch target, transformers 5.15 in .venv-ref) and our
    harness give the same outputs and the same accepted-length sequences."""
    ref_py = ROOT / ".venv-ref" / "bin" / "python"
    assert ref_py.exists(), "reference env missing: run `make ref-venv` (creates .venv-ref)"
    prompts = fx.random_prompts(3, (4, 12), seed=5) + fx.random_prompts(1, seed=11)
    pfile = art["dir"] / "parity_prompts.jsonl"
    pfile.write_text("\n".join(json.dumps({"input_ids": p}) for p in prompts))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    res = subprocess.run([str(ref_py), str(ROOT / "tools" / "ref_generate.py"), "--model", str(art["target"]),
                          "--draft", str(art["trained"]), "--prompts", str(pfile), "--max-new-tokens", "30"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = json.loads(res.stdout.strip().splitlines()[-1])
    ours = [_spec(target, art["trained"], p, new=30) for p in prompts]
    assert [g.tokens for g in ours] == ref["outputs"]
    assert [g.accept_lengths for g in ours] == ref["acceptance_lengths"]
    assert max(max(a) for a in ref["acceptance_lengths"]) >= 3  # not the trivial all-ones case
