"""Anchor rule: only positions t with loss_mask[t] and loss_mask[t+1], never the last token,
capped by the sequence, reproducible from (seed, epoch, index); block labels past the end masked."""
import jax.numpy as jnp
import numpy as np

from train.anchors import block_labels, draw_anchors, valid_anchor_positions


def _brute_valid(mask):
    return [t for t in range(len(mask) - 1) if mask[t] and mask[t + 1]]


def test_valid_positions_edge_cases():
    cases = [
        [0, 0, 0, 0],              # nothing supervised
        [1, 1, 1, 1],              # everything: last token is no anchor
        [0, 1, 0, 1, 0, 1],        # isolated supervised tokens: no pair
        [1],                       # length 1
        [0, 0, 1, 1],              # supervised suffix
        [1, 1, 0, 0, 1, 1, 1],     # two spans
    ]
    for m in cases:
        assert valid_anchor_positions(np.array(m, np.uint8)).tolist() == _brute_valid(m)


def test_draw_respects_rule_and_caps():
    rng = np.random.default_rng(0)
    for trial in range(200):
        t = int(rng.integers(1, 40))
        mask = (rng.random(t) < rng.random()).astype(np.uint8)
        n = int(rng.integers(1, 50))
        anchors, valid = draw_anchors(mask, n, seed=1, epoch=trial, index=3)
        allowed = set(_brute_valid(mask.tolist()))
        chosen = anchors[valid].tolist()
        assert len(chosen) == min(n, len(allowed))
        assert set(chosen) <= allowed and len(set(chosen)) == len(chosen)
        assert chosen == sorted(chosen)
        assert (anchors[~valid] == 0).all() and valid[:len(chosen)].all()


def test_draw_reproducible_and_changes_with_epoch():
    mask = np.ones(300, np.uint8)
    a = draw_anchors(mask, 16, seed=5, epoch=2, index=11)[0]
    assert (a == draw_anchors(mask, 16, seed=5, epoch=2, index=11)[0]).all()
    assert not (a == draw_anchors(mask, 16, seed=5, epoch=3, index=11)[0]).all()
    assert not (a == draw_anchors(mask, 16, seed=5, epoch=2, index=12)[0]).all()
    assert not (a == draw_anchors(mask, 16, seed=6, epoch=2, index=11)[0]).all()


def test_draw_uniform_over_valid_positions():
    mask = np.array([0, 1, 1, 1, 0, 1, 1, 0], np.uint8)  # valid: 1, 2, 5
    counts = np.zeros(8)
    for e in range(3000):
        a, v = draw_anchors(mask, 1, seed=0, epoch=e, index=0)
        counts[a[v]] += 1
    assert counts[[0, 3, 4, 6, 7]].sum() == 0
    np.testing.assert_allclose(counts[[1, 2, 5]] / 3000, 1 / 3, atol=0.03)


def test_block_labels():
    ids = jnp.array([[10, 11, 12, 13, 14, 15]], jnp.int32)
    mask = jnp.array([[0, 1, 1, 1, 0, 1]], jnp.uint8)
    anchors = jnp.array([[1, 4, 0]], jnp.int32)
    valid = jnp.array([[True, True, False]])
    labels, sup = block_labels(ids, mask, anchors, valid, 4)
    # block at 1: slots -> positions 1,2,3,4; at 4: positions 4,5,6(out),7(out)
    assert labels[0, 0].tolist() == [11, 12, 13, 14]
    assert sup[0, 0].tolist() == [False, True, True, False]
    assert labels[0, 1, :2].tolist() == [14, 15]
    assert sup[0, 1].tolist() == [False, True, False, False]
    assert not sup[0, 2].any()  # padding anchor
