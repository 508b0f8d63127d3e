"""Reference contrastive decoding, straight from the paper (Li et al.), one token at a time.

    V_head = {x : p_expert(x) >= alpha * max p_expert}
    score(x) = log p_expert(x) - beta * log p_amateur_tau(x)   for x in V_head, -inf elsewhere

where ``p_amateur_tau = softmax(amateur_logits / tau)`` is the amateur at temperature ``tau``. The amateur
sees either its whole prompt or only its last prompt token (``amateur_context``), plus the output so far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tests.reference.common import LogProbFn, greedy_loop, sampling_distribution


def amateur_ids(prompt: Sequence[int], generated: Sequence[int], amateur_context: str) -> list[int]:
    """What the amateur reads: its prompt (or only the prompt's last token) and the output so far."""
    head = list(prompt) if amateur_context == "full" else list(prompt)[-1:]
    return head + list(generated)


def next_scores(
    expert: LogProbFn,
    amateur: LogProbFn,
    expert_prompt: Sequence[int],
    amateur_prompt: Sequence[int],
    generated: Sequence[int],
    alpha: float = 0.1,
    beta: float = 1.0,
    tau: float = 0.5,
    amateur_context: str = "full",
    formula: str = "cd",
    acd_alpha: float = 0.5,
) -> torch.Tensor:
    """The contrastive score of every token after ``generated``."""
    log_p_expert = expert(list(expert_prompt) + list(generated))
    amateur_logprobs = amateur(amateur_ids(amateur_prompt, generated, amateur_context))
    if formula == "cd":
        log_p_amateur = torch.log_softmax(amateur_logprobs / tau, dim=-1)
        score = log_p_expert - beta * log_p_amateur
    else:
        score = log_p_expert - acd_alpha * amateur_logprobs
    plausible = log_p_expert >= log_p_expert.max() + (math.log(alpha) if alpha > 0 else float("-inf"))
    return torch.where(plausible, score, torch.tensor(float("-inf"), dtype=score.dtype))


def greedy(
    expert: LogProbFn,
    amateur: LogProbFn,
    expert_prompt: Sequence[int],
    amateur_prompt: Sequence[int],
    max_tokens: int,
    eos: Sequence[int],
    **params: object,
) -> list[int]:
    """Greedy contrastive decoding."""
    return greedy_loop(
        lambda gen: next_scores(expert, amateur, expert_prompt, amateur_prompt, gen, **params),  # type: ignore[arg-type]
        max_tokens,
        eos,
    )


def next_probs(
    expert: LogProbFn,
    amateur: LogProbFn,
    expert_prompt: Sequence[int],
    amateur_prompt: Sequence[int],
    generated: Sequence[int],
    temperature: float,
    **params: object,
) -> torch.Tensor:
    """The sampling distribution ``softmax(score / T)`` after ``generated``."""
    scores = next_scores(expert, amateur, expert_prompt, amateur_prompt, generated, **params)  # type: ignore[arg-type]
    return sampling_distribution(scores, temperature)
