"""Served equals offline: simulated tau (pipeline.speculative.simulate, one training-form forward per
sequence) equals the harness's tau, step for step, on the target's own greedy outputs.

Oracle: the speculative decoder itself (pipeline.speculative.loop with the cached target and the
cached z-lab draft, an implementation independent of model.draft_hidden_train), run on the same
prompts with the same draft and max_new_tokens. Features for the simulation come from one
full-sequence forward of the same cached target (a dump would compute them the same way, with
EasyDeL instead: see docs in pipeline/speculative/simulate.py and the report of issue 13).
"""
import json

import numpy as np
import pytest

from pipeline.speculative import simulate as sim
from pipeline.speculative import loop as sp
from model import load_config
from pipeline.speculative.draft import CachedDraft
from pipeline.speculative.target import CachedTarget
from tests import _spec_fixtures as fx

LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def art(spec_artifacts):
    return spec_artifacts  # one target and trained draft for the session (tests/conftest.py)


@pytest.fixture(scope="module")
def target(art):
    return CachedTarget(art["target"], LAYERS)


def _decode(target, draft_dir, prompts, new):
    shape = load_config(draft_dir)
    draft = CachedDraft(draft_dir, target.params["embed"], target.params["lm_head"])
    gens, ars = [], []
    for p in prompts:
        ars.append(sp.ar_generate(target, p, max_new_tokens=new))
        gens.append(sp.speculative_generate(
            target, sp.DFlashProposer(draft, shape.block_size, shape.mask_token_id), p,
            max_new_tokens=new, block_size=shape.block_size, mask_token_id=shape.mask_token_id))
        assert gens[-1].tokens == ars[-1].tokens  # lossless: the AR output is what was decoded
    return gens, ars


def test_walk_conventions():
    """Hand-worked steps (B = 4): the first anchor is the first generated token, `produced`
    counts the bonus, tail blocks are v = r1 - s long, the last step is cut at the end."""
    t, b = 12, 4
    full = np.ones((t, b - 1), bool)
    runs = [(3, 10)]
    tails = {2: np.ones((1, 1), bool), 3: np.ones((1, 2), bool)}
    # s=3: v=4, a=3, produced 4 -> s=7: v=3 (tail), a=2, produced min(3, 10-7-1=2) = 2 -> s=9 ends
    assert sim.walk(full, tails, runs, b) == [4, 2]
    full[3, 1] = False  # slot 2 at anchor 3 wrong: a = 1 -> produced 2 -> s=5: a=3 -> 4 -> s=9
    assert sim.walk(full, tails, runs, b) == [2, 4]
    tails[3][0, 0] = False  # the tail block of anchor 7 (v=3): never reached on this path
    assert sim.walk(full, tails, runs, b) == [2, 4]
    full[3, 1] = True
    # s=7: tail slot 1 wrong -> produced 1 -> s=8: v=2, a=1, produced min(2, 10-8-1) = 1
    assert sim.walk(full, tails, runs, b) == [4, 1, 1]
    # two runs, the second of a single token: its prefill emits it, no step
    assert sim.walk(np.zeros((t, b - 1), bool), tails, [(1, 4), (6, 7)], b) == [1, 1]
    assert sim.generated_runs([0, 1, 1, 0, 1, 0, 0, 1]) == [(1, 3), (4, 5), (7, 8)]
    np.testing.assert_array_equal(sim.tail_anchors([(3, 10), (11, 12)], b, 2),
                                  [[8, 0], [7, 0]])


@pytest.mark.parametrize("which,new", [("trained", 37), ("untrained", 16)])
def test_simulated_equals_served(art, target, which, new):
    """Per prompt, the simulated accepted lengths == the decoder's, step for step; 37 new tokens
    (not a multiple of B=4) exercise the shorter tail blocks at the end."""
    from pipeline.speculative.harness import simulated_steps

    prompts = fx.random_prompts(4, seed=11) + fx.random_prompts(2, (4, 12), seed=5)
    gens, ars = _decode(target, art[which], prompts, new)
    shape = load_config(art[which])
    steps = simulated_steps(art[which], shape.block_size, target, target.params["embed"],
                            target.params["lm_head"], prompts, ars)
    for s, g in zip(steps, gens):
        assert s == g.accept_lengths
    served = np.mean([x for g in gens for x in g.accept_lengths])
    simulated = np.mean([x for s in steps for x in s])
    assert simulated == served
    print(f"{which}: served tau {served:.4f} simulated tau {simulated:.4f}, per prompt "
          + " ".join(f"{np.mean(g.accept_lengths):.2f}" for g in gens))
    if which == "trained":  # acceptance is really exercised (the trained-on prompts), not tau ~ 1
        assert max(np.mean(g.accept_lengths) for g in gens) > 2.0
        assert sum(x >= 3 for g in gens for x in g.accept_lengths) >= 5


def test_position_offset_is_caught(art, target):
    """The gate catches the field's train/serve bugs: features shifted by one position (the
    classic hidden_states[i] vs [i+1] / position offset) change the simulated steps."""
    import jax.numpy as jnp

    import model

    prompts = fx.random_prompts(4, (4, 12), seed=5)  # trained on: long accepted runs to break
    gens, ars = _decode(target, art["trained"], prompts, 32)
    config, params = model.load_draft(art["trained"], dtype=jnp.float32)
    same = []
    for p, g, a in zip(prompts, gens, ars):
        ids = np.asarray(p + a.tokens, np.int32)
        target.reset(64)
        _, f = target.run(ids, 0, len(ids), 64)
        f = np.asarray(f, np.float32)
        mask = np.zeros(len(ids), np.uint8)
        mask[len(p):] = 1
        emb, head = target.params["embed"], target.params["lm_head"]
        good = sim.simulate_sequence(config, params, emb, head, ids, mask, f, pad_to=64)
        shifted = sim.simulate_sequence(config, params, emb, head, ids, mask,
                                        np.concatenate([f[:1], f[:-1]]), pad_to=64)
        assert good == g.accept_lengths
        same.append(shifted == g.accept_lengths)
    assert not all(same)


def test_harness_prints_both(art, tmp_path, capsys):
    """tools.spec_decode --simulate: the JSON line carries sim_tau == tau and sim_matches."""
    from tools import spec_decode

    prompts = fx.random_prompts(3, seed=17)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    rc = spec_decode.main(["--draft", str(art["trained"]), "--model", str(art["target"]),
                           "--prompts", str(path), "--max-new-tokens", "21", "--no-ngram",
                           "--simulate"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["sim_matches"] is True and report["lossless"] is True
    assert report["sim_tau"] == report["tau"] and report["tau"] > 1.0
    assert "simulated tau" in out.splitlines()[0]
