"""Reference logit arithmetic: ``logits_base + lambda * (logits_aligned - logits_reference)``, in logits.

Written with the models' raw logits (as the papers do), normalised only for sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tests.reference.common import greedy_loop, sampling_distribution

LogitFn = Callable[[list[int]], torch.Tensor]


def next_scores(
    base: LogitFn,
    aligned: LogitFn,
    reference: LogitFn,
    prompts: dict[str, Sequence[int]],
    generated: Sequence[int],
    lam: float,
) -> torch.Tensor:
    """The shifted logits of every token after ``generated`` (each role reads its own prompt)."""
    gen = list(generated)
    return base(list(prompts["base"]) + gen) + lam * (
        aligned(list(prompts["aligned"]) + gen) - reference(list(prompts["reference"]) + gen)
    )


def greedy(
    base: LogitFn,
    aligned: LogitFn,
    reference: LogitFn,
    prompts: dict[str, Sequence[int]],
    max_tokens: int,
    eos: Sequence[int],
    lam: float,
) -> list[int]:
    """Greedy logit arithmetic."""
    return greedy_loop(lambda gen: next_scores(base, aligned, reference, prompts, gen, lam), max_tokens, eos)


def next_probs(
    base: LogitFn,
    aligned: LogitFn,
    reference: LogitFn,
    prompts: dict[str, Sequence[int]],
    generated: Sequence[int],
    lam: float,
    temperature: float,
) -> torch.Tensor:
    """``softmax(shifted logits / T)`` after ``generated``."""
    return sampling_distribution(next_scores(base, aligned, reference, prompts, generated, lam), temperature)
