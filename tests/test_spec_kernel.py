"""Pure pieces of speculative decoding: the rejection-sampling kernel (statistically), the
inverse-CDF sampler, and the n-gram prompt-lookup proposer."""
import numpy as np
import pytest
from scipy.stats import chisquare

from pipeline.speculative import loop as sp


def _rows(rng, n, v, peak):
    z = rng.normal(size=(n, v)) * peak
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("g", [1, 3])
def test_rejection_sampling_emits_target_distribution(g):
    """Draft tokens d_k ~ q_k; after the kernel, emitted token j (for j <= accepted) must be
    distributed as p_j, whatever q is: chi-square on 20k runs, fixed seed."""
    rng = np.random.default_rng(1234)
    V, runs = 6, 20000
    p = _rows(rng, g + 1, V, 1.0)
    q = _rows(rng, g, V, 1.5)  # deliberately different from p
    first, second = np.zeros(V), np.zeros(V)
    n_second = 0
    for _ in range(runs):
        d = np.array([sp.sample_from(q[k], rng.random()) for k in range(g)])
        a, nxt = sp.rejection_sample(d, p, q, rng.random(g), rng.random())
        emitted = list(d[:a]) + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
            n_second += 1
    assert chisquare(first, p[0] * runs).pvalue > 1e-3
    if g > 1:  # rows are independent of the prefix here, so token 2 ~ p[1] too
        assert chisquare(second, p[1] * n_second).pvalue > 1e-3
    # and the kernel is not a no-op: a wrong target fails the same test
    wrong = np.roll(p[0], 1)
    assert chisquare(first, wrong * runs).pvalue < 1e-6


def test_rejection_sampling_edge_cases():
    p = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.0, 1.0, 0.0]])
    # q == p on the drafted token: always accepted, bonus from the last row
    a, t = sp.rejection_sample(np.array([1]), p, q, np.array([0.999]), 0.1)
    assert (a, t) == (1, 0)
    # draft token impossible under p: always rejected, resample from max(p - q, 0) = p here
    q2 = np.array([[1.0, 0.0, 0.0]])
    a, t = sp.rejection_sample(np.array([0]), p, q2, np.array([0.0]), 0.5)
    assert (a, t) == (0, 1)


def test_sample_from_is_inverse_cdf():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    assert [sp.sample_from(probs, r) for r in (0.0, 0.05, 0.1, 0.69, 0.7, 0.999)] == [0, 0, 2, 2, 3, 3]


def test_ngram_proposer_prompt_lookup():
    prop = sp.NgramProposer(max_ngram=3)
    seq = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert prop.propose(seq, 4, 0.0, None) == ([8, 9, 1], None)  # 3-gram [5,6,7] matched
    assert prop.propose(seq, 2, 0.0, None) == ([8], None)  # block size caps the proposal
    assert prop.propose([1, 2, 3, 4], 4, 0.0, None) == ([], None)  # nothing repeats
    assert prop.propose([3, 4, 3, 9, 9, 3], 3, 0.0, None) == ([9, 9], None)  # most recent 1-gram [3]
