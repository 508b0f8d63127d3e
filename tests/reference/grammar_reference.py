"""Grammar-aligned decoding written for clarity: a regular-expression grammar, masks by brute force, full
vocabulary log-probabilities, one token at a time, nothing cached between steps but what ASAp must keep.

Masks: a token is allowed when the output followed by the token's text can still be completed to a full
match of the pattern (``regex`` partial matching); end-of-sequence is allowed when the output already
matches. Tokens without text (special tokens) are never allowed.

``constrained``: the raw distribution restricted to the allowed tokens and renormalised.

``asap`` (Park et al., "Grammar-Aligned Decoding", Algorithm 1): every prefix a sample went through keeps the
raw probabilities of its allowed tokens. The expected future grammaticality of a prefix is recomputed from
scratch every time it is needed, ``θ(w) = Σ_{t allowed after w} P(t | w)·θ(w t)``, with ``θ = 1`` for
prefixes no sample has reached yet and for a finished string. A step draws ``t`` with probability
proportional to ``P(t | w)·θ(w t)`` over the allowed tokens.

Sampling draws one uniform number per step from the given generator and inverts the cumulative
distribution over token ids in increasing order (the same rule as the decoder's sampler), so with the same
seeds the reference and the decoder draw the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import regex
import torch

from tests.reference.common import LogProbFn


class GrammarReference:
    """Samples (or greedy-decodes) outputs of one model under a regex, in ``constrained`` or ``asap`` mode."""

    def __init__(
        self,
        logprobs: LogProbFn,
        tokenizer: object,
        prompt_ids: Sequence[int],
        pattern: str,
        eos: int,
        vocab_size: int,
        mode: str = "constrained",
    ) -> None:
        self.logprobs = logprobs
        self.tokenizer = tokenizer
        self.prompt = list(prompt_ids)
        self.pattern = regex.compile(pattern)
        self.eos = eos
        self.vocab_size = vocab_size
        self.mode = mode
        self.seen: dict[tuple[int, ...], dict[int, float]] = {}  # prefix -> {allowed token: raw P}

    def allowed(self, output: list[int]) -> list[int]:
        """Brute force: every token whose text keeps the output completable."""
        text = self.tokenizer.decode(output)
        out = []
        for t in range(self.vocab_size):
            if t == self.eos:
                if self.pattern.fullmatch(text):
                    out.append(t)
                continue
            piece = self.tokenizer.decode([*output, t])
            grows = len(piece) > len(text) and piece.startswith(text) and "\ufffd" not in piece
            if grows and self.pattern.fullmatch(piece, partial=True):
                out.append(t)
        return out

    def theta(self, prefix: tuple[int, ...]) -> float:
        """The ASAp estimate of the expected future grammaticality of ``prefix``."""
        if prefix and prefix[-1] == self.eos:
            return 1.0
        row = self.seen.get(prefix)
        if row is None:
            return 1.0
        return sum(p * self.theta((*prefix, t)) for t, p in row.items())

    def step_distribution(self, output: list[int]) -> tuple[list[int], np.ndarray]:
        """The allowed tokens and the probabilities this step draws them with."""
        allowed = self.allowed(output)
        raw = self.logprobs(self.prompt + output).to(torch.float64).numpy()
        weights = np.array([np.exp(raw[t]) for t in allowed])
        if self.mode == "asap":
            self.seen.setdefault(tuple(output), {t: float(np.exp(raw[t])) for t in allowed})
            weights = weights * np.array([self.theta((*output, t)) for t in allowed])
        return allowed, weights / weights.sum()

    def run(self, max_tokens: int, rng: np.random.Generator | None = None) -> list[int]:
        """One output (without EOS): greedy without ``rng``, a draw with it."""
        output: list[int] = []
        for _ in range(max_tokens):
            allowed, probs = self.step_distribution(output)
            if rng is None:
                token = allowed[int(np.argmax(probs))]
            else:
                cumulative = np.cumsum(probs)
                u = rng.random() * cumulative[-1]
                token = allowed[min(int(np.searchsorted(cumulative, u, side="right")), len(allowed) - 1)]
            if token == self.eos:
                break
            output.append(token)
        return output


__all__ = ["GrammarReference"]
