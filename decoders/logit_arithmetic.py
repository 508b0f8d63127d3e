"""Logit arithmetic: ``base + lambda * (aligned - reference)`` over the full shared vocabulary.

One formula behind decoding-time realignment (Liu et al., "Decoding-time Realignment of Language Models"),
proxy-tuning (Liu et al., "Tuning Language Models by Proxy": a large base steered by the difference between
a small tuned model and its untuned version) and DExperts (Liu et al.: expert minus anti-expert). At each
position::

    score(x) = log p_base(x) + lambda * (log p_aligned(x) - log p_reference(x))

over the whole vocabulary, then greedy argmax or a draw from ``softmax(score / T)`` with the request's
temperature and filters. ``lambda`` is set per request; values above 1 extrapolate (decoding-time
realignment's lambda > 1), 0 gives the base alone, 1 proxy-tuning. Raw log-probabilities differ from
logits by a constant per position and model, so this equals the logit formula of the papers exactly.

Exact over the shared vocabulary: unlike the top-100 approximation of proxy-tuning in the nudging
repository (fywalter/nudging), every role gives its full distribution at every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field

from alignd.decoders.contract import DecoderContext, RoleSpec, StepView, ViewSpec
from alignd.decoders.token_level import (
    Scores,
    SpeculativeParams,
    Step,
    TokenLevelDecoder,
    TokenLevelParams,
    token_text,
)

__all__ = ["LogitArithmetic", "LogitArithmeticParams", "LogitArithmeticSpeculative", "arithmetic_scores"]


class LogitArithmeticSpeculative(SpeculativeParams):
    """Draft-and-verify for logit arithmetic: the base drafts by default."""

    draft_role: Literal["base", "aligned", "reference"] = Field(
        default="base", description="The role that drafts blocks."
    )


class LogitArithmeticParams(TokenLevelParams):
    """Parameters of logit arithmetic."""

    model_config = ConfigDict(populate_by_name=True)

    lam: float = Field(
        default=1.0,
        alias="lambda",
        ge=-10.0,
        le=10.0,
        description="Strength of the shift (aligned - reference): 0 = base alone, 1 = proxy-tuning, >1 "
        "extrapolates, <0 steers away.",
    )
    speculative: LogitArithmeticSpeculative | None = Field(  # type: ignore[assignment]
        default=None, description="Speculative draft-and-verify (lossless); off when null."
    )


def arithmetic_scores(base: np.ndarray, aligned: np.ndarray, reference: np.ndarray, lam: float) -> np.ndarray:
    """``base + lam * (aligned - reference)``; ``-inf`` where any term is not finite."""
    finite = np.isfinite(base) & np.isfinite(aligned) & np.isfinite(reference)
    with np.errstate(invalid="ignore"):
        out = base + lam * (aligned - reference)
    return np.where(finite, out, -np.inf)


class LogitArithmetic(TokenLevelDecoder):
    """Steer a base model by the difference between an aligned model and its reference."""

    name: ClassVar[str] = "logit_arithmetic"
    description: ClassVar[str] = (
        "Logit arithmetic (decoding-time realignment, proxy-tuning, DExperts): log p_base + lambda * "
        "(log p_aligned - log p_reference) over the full shared vocabulary."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (
        RoleSpec("base", "The model being steered (writes the output)."),
        RoleSpec("aligned", "The aligned (tuned, expert) model."),
        RoleSpec("reference", "The aligned model's untuned reference (or the anti-expert)."),
    )
    params_model: ClassVar[type[LogitArithmeticParams]] = LogitArithmeticParams
    shared_vocab: ClassVar[bool] = True
    params: LogitArithmeticParams

    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        """Full distributions of all three roles (exactness needs the whole vocabulary)."""
        return {role: ViewSpec(full=True) for role in ("base", "aligned", "reference")}

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        """The shifted base distribution at ``step``."""
        v = step.vocab_size
        base = views["base"].dense(v)
        aligned, reference = views["aligned"].dense(v), views["reference"].dense(v)
        with np.errstate(invalid="ignore"):
            shift = aligned - reference
        logits = arithmetic_scores(base, aligned, reference, self.params.lam)
        allowed_base = base if step.allowed is None else np.where(step.allowed, base, -np.inf)
        top = int(np.argmax(allowed_base))
        ctx = step.ctx

        def explain(token: int) -> str:
            text = token_text(ctx, "base", token)
            if token == top:
                return f"logit_arithmetic: base top-1 {text!r} kept (shift {shift[token]:+.2f})"
            return (
                f"logit_arithmetic: base top-1 {token_text(ctx, 'base', top)!r} overruled; chose {text!r} "
                f"(shift {shift[token]:+.2f} vs {shift[top]:+.2f})"
            )

        return Scores(logits, explain=explain)
