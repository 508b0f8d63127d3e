"""Reference ARGS (Khanov et al.), one token at a time, every candidate scored separately.

    candidates = the base's k most likely next tokens
    score(c)   = log p_base(c) + w * reward(prompt + output + c)

Greedy takes the best candidate; sampling draws from ``softmax(score / T)`` over the candidates. The reward
is a function of token ids of prompt + output + candidate (an end-of-sequence candidate adds nothing to the
text, so it is scored on prompt + output), as in the reference code; ``combine`` adds several rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tests.reference.common import LogProbFn, greedy_loop

RewardFn = Callable[[list[int], list[int], int], float]
"""(prompt ids, output ids, candidate) -> reward."""


def candidate_scores(
    base: LogProbFn,
    prompt: Sequence[int],
    generated: Sequence[int],
    reward: RewardFn,
    k: int,
    w: float,
) -> tuple[list[int], torch.Tensor]:
    """The candidates (most likely first) and their scores."""
    log_p = base(list(prompt) + list(generated))
    top = torch.topk(log_p, k)
    candidates = [int(c) for c in top.indices]
    scores = torch.tensor(
        [float(log_p[c]) + w * reward(list(prompt), list(generated), c) for c in candidates],
        dtype=torch.float64,
    )
    return candidates, scores


def next_scores(
    base: LogProbFn,
    prompt: Sequence[int],
    generated: Sequence[int],
    reward: RewardFn,
    k: int,
    w: float,
    vocab: int,
) -> torch.Tensor:
    """Vocabulary-sized scores: the candidates' ARGS scores, ``-inf`` elsewhere."""
    candidates, scores = candidate_scores(base, prompt, generated, reward, k, w)
    out = torch.full((vocab,), float("-inf"), dtype=torch.float64)
    out[candidates] = scores
    return out


def greedy(
    base: LogProbFn,
    prompt: Sequence[int],
    reward: RewardFn,
    k: int,
    w: float,
    vocab: int,
    max_tokens: int,
    eos: Sequence[int],
) -> list[int]:
    """Greedy ARGS, stopping at EOS (the reference code never stops; alignd does)."""
    return greedy_loop(lambda gen: next_scores(base, prompt, gen, reward, k, w, vocab), max_tokens, eos)


def next_probs(
    base: LogProbFn,
    prompt: Sequence[int],
    generated: Sequence[int],
    reward: RewardFn,
    k: int,
    w: float,
    vocab: int,
    temperature: float,
) -> torch.Tensor:
    """``softmax(score / T)`` over the candidates."""
    return torch.softmax(next_scores(base, prompt, generated, reward, k, w, vocab) / temperature, dim=-1)


def model_reward(reward_model_ids: Callable[[list[int]], float], eos: Sequence[int]) -> RewardFn:
    """A reward from a reward model over ids: prompt + output + candidate (EOS candidates add nothing)."""
    return lambda prompt, generated, c: reward_model_ids(prompt + generated + ([] if c in eos else [c]))


def implicit_reward(
    aligned: LogProbFn, reference: LogProbFn, aligned_prompt: Sequence[int], reference_prompt: Sequence[int]
) -> RewardFn:
    """``log p_aligned(c) - log p_reference(c)`` after the output so far."""

    def fn(prompt: list[int], generated: list[int], c: int) -> float:
        return float(
            aligned(list(aligned_prompt) + generated)[c] - reference(list(reference_prompt) + generated)[c]
        )

    return fn
