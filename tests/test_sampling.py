"""Sampling arithmetic on synthetic logits: the processing chain, the counter-based draw, and a
chi-square check that draws follow the processed distribution (with a wrong sampler it rejects)."""
from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest

from shared.sampling import Sampling, choose, distribution, draw, gumbel_noise, support

from conftest import LOSSLESS_REPORT
from stats import chi_square

LOGITS = np.log(np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])).astype(np.float32)
# 50,000 draws still reject the wrong samplers below by a factor of ~200 over the critical value,
# and keep the quick loop under a minute; SLED_SAMPLING_TRIALS=200000 is the long run.
TRIALS = int(os.environ.get("SLED_SAMPLING_TRIALS", "50000"))
# chi-square critical value for 7 degrees of freedom at significance 0.001
CHI2_7_AT_0001 = 24.322


def test_processing_follows_llama_cpps_chain():
    assert support(LOGITS, Sampling(1.0, top_k=3)).tolist() == [0, 1, 2]
    assert support(LOGITS, Sampling(1.0, top_p=0.5)).tolist() == [0, 1]  # 0.30 + 0.25 >= 0.5
    assert support(LOGITS, Sampling(1.0, top_p=0.56)).tolist() == [0, 1, 2]
    assert support(LOGITS, Sampling(1.0, min_p=0.3)).tolist() == [0, 1, 2, 3]  # p >= 0.09
    # top-k first, then top-p over the renormalised survivors: 0.30/0.55 < 0.6 <= 0.55/0.55
    assert support(LOGITS, Sampling(1.0, top_k=2, top_p=0.6)).tolist() == [0, 1]
    ids, probs = distribution(LOGITS, Sampling(0.5, top_k=2))
    assert ids.tolist() == [0, 1] and probs[0] == pytest.approx(0.3**2 / (0.3**2 + 0.25**2))


def test_a_draw_depends_only_on_seed_position_and_logits():
    s = Sampling(1.0)
    forward = [choose(LOGITS, s, 42, pos) for pos in range(100)]
    backward = [choose(LOGITS, s, 42, pos) for pos in reversed(range(100))][::-1]
    assert forward == backward
    assert forward != [choose(LOGITS, s, 43, pos) for pos in range(100)]
    assert np.array_equal(gumbel_noise(1, 5, 8), gumbel_noise(1, 5, 8))


def test_greedy_draws_the_argmax_with_its_top2_gap():
    token, margin = draw(LOGITS, Sampling(), 0, 0)
    assert token == 0 and margin == pytest.approx(math.log(0.30 / 0.25), rel=1e-5)


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.9, min_p=0.1)],
                         ids=["t1", "t0.7-topk5", "t1.3-topp0.9-minp0.1"])
def test_draws_follow_the_processed_distribution(sampling):
    ids, probs = distribution(LOGITS, sampling)
    counts = Counter(choose(LOGITS, sampling, 7, pos) for pos in range(TRIALS))
    stat, dof, p = chi_square(counts, dict(zip(ids.tolist(), probs)), TRIALS)
    LOSSLESS_REPORT.append(f"sampler {sampling}: chi-square {stat:.2f} over {dof} dof, p = {p:.3f}")
    assert p > 0.001, (stat, p)


def test_the_chi_square_check_rejects_a_biased_sampler():
    """A sampler that forgets the temperature (draws at T = 1 when asked for 0.7) must fail."""
    asked, used = Sampling(0.7), Sampling(1.0)
    ids, probs = distribution(LOGITS, asked)
    counts = Counter(choose(LOGITS, used, 7, pos) for pos in range(TRIALS))
    stat, _, p = chi_square(counts, dict(zip(ids.tolist(), probs)), TRIALS)
    LOSSLESS_REPORT.append(f"biased sampler (T=1 for 0.7): chi-square {stat:.1f}, p = {p:.2g} (rejected)")
    assert stat > CHI2_7_AT_0001


VOCAB = 8
# (name, p over the vocabulary, q' over the vocabulary): generic overlap, q' with a tiny support,
# p with zeros, q' truncated to its top-2 and renormalised.
CASES = [
    ("overlap", [0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02], [0.10, 0.40, 0.05, 0.15, 0.10, 0.10, 0.05, 0.05]),
    ("tiny-q", [0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
    ("p-zeros", [0.0, 0.5, 0.0, 0.3, 0.0, 0.2, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
    ("q-top2", [0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02], [0.0, 0.0, 0.6, 0.4, 0.0, 0.0, 0.0, 0.0]),
]


def speculative_outputs(p_full, q_full, trials: int, residual_from_p: bool = False) -> Counter:
    """Draw x ~ q' and apply one rejection step; the output token of each trial."""
    from shared.protocol import Proposal
    from verifier_server.acceptance import rejection_step

    p_full, q_full = np.asarray(p_full), np.asarray(q_full)
    p_ids = np.flatnonzero(p_full)
    q_ids = np.flatnonzero(q_full)
    proposal = Proposal(ids=q_ids.tolist(), probs=q_full[q_ids].tolist())
    xs = np.random.default_rng(0).choice(VOCAB, size=trials, p=q_full)
    out: Counter = Counter()
    for t, x in enumerate(xs):
        if residual_from_p:  # a classic bug: on rejection, resample from p instead of the residual
            token = rejection_step(p_ids, p_full[p_ids], proposal, int(x), 11, t, VOCAB)
            if token is not None:
                token = choose(np.log(np.maximum(p_full, 1e-300)), Sampling(1.0), 11, t)
        else:
            token = rejection_step(p_ids, p_full[p_ids], proposal, int(x), 11, t, VOCAB)
        out[int(x) if token is None else token] += 1
    return out


@pytest.mark.parametrize("name,p,q", CASES, ids=[c[0] for c in CASES])
def test_speculative_sampling_outputs_follow_the_target(name, p, q):
    counts = speculative_outputs(p, q, TRIALS)
    ids = np.flatnonzero(p)
    stat, dof, pvalue = chi_square(counts, dict(zip(ids.tolist(), np.asarray(p)[ids])), TRIALS)
    LOSSLESS_REPORT.append(f"rejection sampler, {name}: chi-square {stat:.2f} over {dof} dof, "
                           f"p = {pvalue:.3f} ({TRIALS} trials)")
    assert pvalue > 0.001, (stat, pvalue)


def test_the_chi_square_check_rejects_a_wrong_rejection_sampler():
    _, p, q = CASES[0]
    counts = speculative_outputs(p, q, TRIALS, residual_from_p=True)
    ids = np.flatnonzero(p)
    stat, _, pvalue = chi_square(counts, dict(zip(ids.tolist(), np.asarray(p)[ids])), TRIALS)
    LOSSLESS_REPORT.append(f"wrong rejection sampler (resamples from p): chi-square {stat:.1f}, p = {pvalue:.2g} (rejected)")
    assert stat > CHI2_7_AT_0001
