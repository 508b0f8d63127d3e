"""The pure sampling and speculative-rejection math of ``alignd.decoders.speculative``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from alignd.decoders.speculative import (
    log_softmax,
    prompt_lookup,
    residual_probs,
    sample_from,
    sampling_probs,
    speculative_step,
)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, "a zero-probability outcome was drawn"
    expected = probs[support] * counts.sum()
    return float(chisquare(counts[support], expected).pvalue)


def test_log_softmax_normalises_and_keeps_minus_inf() -> None:
    out = log_softmax(np.array([1.0, 2.0, -np.inf]))
    assert np.isclose(np.exp(out).sum(), 1.0)
    assert out[2] == -np.inf
    assert np.all(log_softmax(np.array([-np.inf, -np.inf])) == -np.inf)


def test_sampling_probs_temperature_and_filters() -> None:
    scores = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    assert np.allclose(sampling_probs(scores, 1.0), [0.5, 0.25, 0.15, 0.1])
    sharp = sampling_probs(scores, 0.5)
    assert np.allclose(sharp, np.array([0.25, 0.0625, 0.0225, 0.01]) / 0.345)
    assert np.allclose(sampling_probs(scores, 1.0, top_k=2), [2 / 3, 1 / 3, 0, 0])
    assert np.allclose(sampling_probs(scores, 1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0])
    assert np.allclose(sampling_probs(scores, 1.0, top_p=0.75), [2 / 3, 1 / 3, 0, 0])
    assert np.allclose(sampling_probs(scores, 1.0, top_p=0.76), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    assert np.allclose(sampling_probs(scores, 1.0, min_p=0.3), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    with pytest.raises(ValueError):
        sampling_probs(scores, 0.0)


def test_sample_from_matches_distribution_and_avoids_zeros() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.0, 0.5, 0.0, 0.3, 0.2])
    counts = np.bincount([sample_from(probs, rng) for _ in range(4000)], minlength=5)
    assert _chi2_pvalue(counts, probs) > 1e-3


def test_residual_is_normalised_positive_part() -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.5, 0.3])
    assert np.allclose(residual_probs(p, q), [1.0, 0.0, 0.0])
    assert np.allclose(residual_probs(p, p), p)


def _speculative_counts(p: np.ndarray, q: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(p.size, dtype=np.int64)
    for _ in range(n):
        draft = sample_from(q, rng)
        _, token = speculative_step(p, q, draft, rng)
        counts[token] += 1
    return counts


@pytest.mark.parametrize("case", range(4))
def test_speculative_step_output_is_distributed_as_target(case: int) -> None:
    rng = np.random.default_rng(100 + case)
    vocab = 8
    p = sampling_probs(rng.normal(0, 1.5, vocab), 1.0)
    q = sampling_probs(rng.normal(0, 1.5, vocab), 1.0)
    if case == 3:  # sparse target (a grammar mask or a candidate set) against a dense draft
        p[[1, 4, 6]] = 0.0
        p /= p.sum()
    counts = _speculative_counts(p, q, 6000, seed=case)
    assert _chi2_pvalue(counts, p) > 1e-3


def test_chi_square_detects_a_wrong_draft_distribution() -> None:
    """The test above has power: verifying against a q the draft did not sample from is caught."""
    rng = np.random.default_rng(7)
    vocab = 8
    p = sampling_probs(rng.normal(0, 1.5, vocab), 1.0)
    q_true = sampling_probs(rng.normal(0, 1.5, vocab), 1.0)
    q_claimed = sampling_probs(rng.normal(0, 1.5, vocab), 1.0)  # e.g. the previous position's distribution
    sampler = np.random.default_rng(1)
    counts = np.zeros(vocab, dtype=np.int64)
    for _ in range(6000):
        draft = sample_from(q_true, sampler)
        _, token = speculative_step(p, q_claimed, draft, sampler)
        counts[token] += 1
    assert _chi2_pvalue(counts, p) < 1e-6


def test_identical_distributions_always_accept() -> None:
    rng = np.random.default_rng(3)
    p = sampling_probs(rng.normal(0, 1, 6), 1.0)
    for token in range(6):
        assert speculative_step(p, p, token, rng) == (True, token)


def test_prompt_lookup_proposes_what_followed_the_longest_latest_match() -> None:
    # the last 3 tokens (7, 8, 9) occurred twice; the latest occurrence's continuation wins
    history = [7, 8, 9, 1, 2, 0, 7, 8, 9, 3, 4, 5, 6, 7, 8, 9]
    assert prompt_lookup(history, 1, 3, 2) == [3, 4]
    # a longer match beats a more recent shorter one: (5, 9) occurs once, 9 alone more recently
    assert prompt_lookup([5, 9, 1, 2, 9, 3, 5, 9], 1, 2, 2) == [1, 2]
    assert prompt_lookup([5, 9, 1, 2, 9, 3, 5, 9], 1, 1, 2) == [3, 5]
    # below the shortest n-gram, or with no earlier occurrence, nothing is proposed
    assert prompt_lookup([1, 2, 3, 4, 2], 2, 3, 4) == []
    assert prompt_lookup([1, 2, 3, 4, 2], 1, 3, 4) == [3, 4, 2, 3]
    assert prompt_lookup([4], 1, 3, 4) == []
    assert prompt_lookup([1, 2, 1, 2], 1, 3, 0) == []


def test_prompt_lookup_proposes_a_repeating_loop_for_the_whole_block() -> None:
    assert prompt_lookup([0, 1, 2, 1, 2], 2, 2, 7) == [1, 2, 1, 2, 1, 2, 1]
    assert prompt_lookup([3, 3], 1, 4, 5) == [3, 3, 3, 3, 3]
