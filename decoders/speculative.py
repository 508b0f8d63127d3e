"""Sampling distributions and speculative rejection sampling: pure numpy math, no engine, no decoder state.

Speculative draft-and-verify (Leviathan et al. 2023, Chen et al. 2023): a draft distribution ``q`` proposes
a token ``x``; it is kept with probability ``min(1, p(x) / q(x))`` where ``p`` is the target distribution,
and on rejection a token is drawn from ``norm(max(0, p - q))``. The output is then distributed exactly as
``p``, whatever ``q`` is, provided ``q`` is the distribution ``x`` was really drawn from.

A draft may also come from no model at all: prompt lookup (n-gram drafting, Saxena 2023; vLLM's ``ngram``
method) proposes the tokens that followed the latest earlier occurrence of the context's last ``n`` tokens
(:func:`prompt_lookup`). Its ``q`` is one-hot on the proposed token, so a drafted token is kept with
probability ``p(x)`` and a rejection draws from ``p`` without ``x``: still exactly ``p``.

Both distributions must be the ones *at the position that predicts x*: for the ``i``-th token of a drafted
block, the draft's distribution after ``context + block[:i]`` and the target's distribution after the same
context. The CARDS repository (lblaoke/CARDS, ``reward_sampling.py``, ``sd_generate``) keeps only the last
``K + 1`` positions of the logits but indexes the residual with the absolute position ``pre_len + accept_num
- 1``, so its replacement token is drawn from the wrong position's distributions (and re-tempered a second
time); alignd indexes both by the drafted token's own position (see :func:`speculative_step`).

The order of the sampling filters of :func:`sampling_probs` is: temperature, then ``min_p`` (relative to the
most likely token), then ``top_k``, then ``top_p`` (nucleus over the renormalised remainder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["log_softmax", "prompt_lookup", "residual_probs", "sample_from", "sampling_probs", "speculative_step"]

_EPS = 1e-12


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Normalised log-probabilities of ``scores`` (``-inf`` entries stay ``-inf``); all ``-inf`` stays so."""
    scores = np.asarray(scores, dtype=np.float64)
    top = np.max(scores) if scores.size else -np.inf
    if not np.isfinite(top):
        return np.full_like(scores, -np.inf)
    shifted = scores - top
    finite = np.isfinite(shifted)
    # exp(-inf) takes numpy's slow path: on a vocabulary of masked scores, summing only the finite ones is
    # many times faster (0.47 ms against a few us on SmolLM2's 49k vocabulary with 32 candidates)
    kept = shifted if finite.all() else shifted[finite]
    return shifted - np.log(np.sum(np.exp(kept)))


def sampling_probs(
    scores: np.ndarray,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
) -> np.ndarray:
    """The distribution a sampler draws from: ``softmax(scores / temperature)`` after min-p, top-k, top-p.

    ``scores`` are log-space scores (``-inf`` for excluded tokens); ``temperature`` must be positive. The
    result sums to one (all zeros only when every score is ``-inf``).
    """
    if temperature <= 0:
        raise ValueError("sampling_probs needs a positive temperature; greedy decoding takes the argmax")
    logp = log_softmax(np.asarray(scores, dtype=np.float64) / temperature)
    finite = np.isfinite(logp)
    if finite.all():
        probs = np.exp(logp)
    else:  # exp(-inf) takes numpy's slow path (see log_softmax)
        probs = np.zeros_like(logp)
        probs[finite] = np.exp(logp[finite])
    if not probs.any():
        return probs
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    if 0 < top_k < probs.size:
        kth = np.partition(probs, -top_k)[-top_k]
        keep = probs >= kth
        if keep.sum() > top_k:  # ties at the boundary: keep the lowest token ids, as a stable sort would
            order = np.argsort(-probs, kind="stable")[:top_k]
            keep = np.zeros_like(keep)
            keep[order] = True
        probs = np.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, top_p - _EPS)) + 1
        keep = np.zeros(probs.size, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


def sample_from(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one index from a probability vector (inverse-CDF with one uniform from ``rng``)."""
    support = np.flatnonzero(probs > 0.0)  # never land on a zero-probability token through rounding
    if support.size == 0:
        raise ValueError("cannot sample from an all-zero distribution")
    cumulative = np.cumsum(probs[support])
    u = rng.random() * cumulative[-1]
    pos = min(int(np.searchsorted(cumulative, u, side="right")), support.size - 1)
    return int(support[pos])


def residual_probs(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``norm(max(0, p - q))``: where to sample after a rejected draft; ``p`` itself if the residual is 0."""
    diff = np.maximum(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64), 0.0)
    total = diff.sum()
    if total <= _EPS:
        # p == q up to rounding: a rejection has (numerically) zero probability; fall back to p.
        return np.asarray(p, dtype=np.float64) / np.sum(p)
    return diff / total


def speculative_step(
    p: np.ndarray, q: np.ndarray, draft_token: int, rng: np.random.Generator
) -> tuple[bool, int]:
    """Verify one drafted token: ``(True, draft_token)`` if kept, else ``(False, replacement)``.

    ``p`` is the target distribution and ``q`` the draft's sampling distribution, both at the position that
    predicts ``draft_token``. Uses one uniform from ``rng`` for the test and, on rejection, one more for the
    replacement.
    """
    px = float(p[draft_token])
    qx = float(q[draft_token])
    u = rng.random()
    if px > 0.0 and (qx <= 0.0 or u < min(1.0, px / qx)):
        return True, draft_token
    return False, sample_from(residual_probs(p, q), rng)


def prompt_lookup(history: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens proposed by prompt lookup: what followed the latest earlier occurrence of the last
    ``n`` tokens of ``history``, for the longest ``n`` from ``max_n`` down to ``min_n`` that occurs; empty
    when none does. A match near the end (a repeating loop) proposes what it has and is looked up again
    with its proposal appended, so a loop is proposed for all ``k`` tokens."""
    arr = np.asarray(history, dtype=np.int64)
    out: list[int] = []
    while len(out) < k:
        more = _lookup_once(arr, min_n, max_n, k - len(out))
        if not more:
            break
        out.extend(more)
        arr = np.concatenate([arr, np.asarray(more, dtype=np.int64)])
    return out


def _lookup_once(arr: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    for n in range(min(max_n, arr.size - 1), min_n - 1, -1):
        # windows of arr[:-1] end before the last token, so each has a continuation and none is the suffix
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        starts = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if starts.size:
            begin = int(starts[-1]) + n
            return [int(t) for t in arr[begin : begin + k]]
    return []
