"""Shared helpers of the reference implementations: plain loops, written for clarity, not speed.

A reference model is a function ``ids -> torch.Tensor`` giving the full next-token log-distribution after
``ids`` (``tests.support.hf_runner.logits_fn`` builds one from a transformers model by recomputing the whole
context; :func:`numpy_model` wraps a numpy fake).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogProbFn = Callable[[list[int]], torch.Tensor]


def numpy_model(model) -> LogProbFn:
    """A reference model from a numpy fake (``tests.support.fake_models``)."""
    return lambda ids: torch.from_numpy(model.logprobs(tuple(ids)).copy())


def greedy_loop(
    next_scores: Callable[[list[int]], torch.Tensor], max_tokens: int, eos: Sequence[int]
) -> list[int]:
    """Greedy decoding: append the argmax of ``next_scores(generated)`` until EOS or ``max_tokens``.

    The EOS token itself is not part of the returned output.
    """
    generated: list[int] = []
    for _ in range(max_tokens):
        token = int(torch.argmax(next_scores(generated)))
        if token in eos:
            break
        generated.append(token)
    return generated


def sampling_distribution(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(scores / temperature)`` (``-inf`` scores get probability 0)."""
    return torch.softmax(scores / temperature, dim=-1)


def sequence_distribution(
    next_probs: Callable[[list[int]], torch.Tensor], length: int, vocab_size: int, eos: Sequence[int] = ()
) -> dict[tuple[int, ...], float]:
    """The exact probability of every output of at most ``length`` tokens (an EOS ends an output early;
    it is not part of the output), by enumerating every sequence."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == length:
            out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + prob
            return
        probs = next_probs(prefix)
        for token in range(vocab_size):
            p = float(probs[token])
            if p <= 0.0:
                continue
            if token in eos:
                out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + prob * p
            else:
                walk(prefix + [token], prob * p)

    walk([], 1.0)
    return out


__all__ = ["LogProbFn", "greedy_loop", "numpy_model", "sampling_distribution", "sequence_distribution"]
