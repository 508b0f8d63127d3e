"""Reward sources for reward-guided decoding (ARGS) and how several are combined.

A reward source scores each candidate continuation ``prefix + candidate`` of a step:

* ``model``: a sequence-classification reward model (role ``reward``, run by the engine's pooling runner),
  given ``(prompt text, response text)`` pairs; all candidates of a step go in one :class:`RewardOp`;
* ``implicit``: the implicit reward of an aligned model against its reference (roles ``aligned`` and
  ``reference``, e.g. a DPO model and its SFT start): ``log p_aligned(c) - log p_reference(c)``, read from
  one view per role restricted to the candidates;
* ``rules``: programmatic rules on the response text (keywords to include or avoid, regular expressions,
  a length target).

Several sources combine by weighted sum, ``sum_s weight_s * r_s``, or (``combine: "log_sigmoid"``) by the
transform of Wang et al., "Transforming and Combining Rewards for Aligning Large Language Models":
``sum_s weight_s * log sigmoid(r_s - reference_s)``. The transform turns each reward into the log-probability
that the response beats a reference point (``reference``: the reward of an acceptable response, e.g. a
baseline's), so the sum reads as the log-probability of being good on *every* property (a logical AND),
and gains on a property that is already well above its reference count for little. The paper takes a
prompt-specific reference (e.g. a high quantile of the base policy's rewards for that prompt); alignd takes
one constant per source, set in the recipe or the request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Candidates",
    "ImplicitReward",
    "LengthRule",
    "ModelReward",
    "RegexRule",
    "RewardSource",
    "RulesReward",
    "combine_rewards",
    "log_sigmoid",
    "rule_rewards",
]


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(
        default=1.0, ge=-100.0, le=100.0, description="Weight of this source in the combination."
    )
    reference: float = Field(
        default=0.0,
        description="Reference value for combine='log_sigmoid': the reward becomes "
        "log sigmoid(r - reference).",
    )


class ModelReward(_Source):
    """A reward model in role ``reward``: the value of its last token on ``prompt + response``."""

    kind: Literal["model"] = "model"


class ImplicitReward(_Source):
    """``log p_aligned(candidate) - log p_reference(candidate)`` from roles ``aligned`` and ``reference``."""

    kind: Literal["implicit"] = "implicit"


class RegexRule(BaseModel):
    """A regular expression searched in the response text; adds ``reward`` when it matches."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="Python regular expression (re.search) over the response text.")
    reward: float = Field(default=1.0, ge=-100.0, le=100.0, description="Added when the pattern matches.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return value


class LengthRule(BaseModel):
    """A length target in tokens: ``-|excess| / target`` (``at_most``), or for ending short (``at_least``)."""

    model_config = ConfigDict(extra="forbid")

    target_tokens: int = Field(ge=1, le=1_000_000, description="The length target, in output tokens.")
    mode: Literal["at_most", "at_least"] = Field(
        default="at_most",
        description="'at_most': penalise tokens beyond the target; 'at_least': penalise ending before it.",
    )


class RulesReward(_Source):
    """Programmatic rules on the response text; the reward is the sum of the rules' terms."""

    kind: Literal["rules"] = "rules"
    include: list[str] = Field(default_factory=list, description="Keywords to include: +1 for each present.")
    avoid: list[str] = Field(default_factory=list, description="Keywords to avoid: -1 for each present.")
    regex: list[RegexRule] = Field(
        default_factory=list, description="Regular expressions with their rewards."
    )
    length: LengthRule | None = Field(default=None, description="A length target.")
    case_sensitive: bool = Field(default=False, description="Whether keywords match case-sensitively.")


RewardSource = Annotated[ModelReward | ImplicitReward | RulesReward, Field(discriminator="kind")]


@dataclass(frozen=True)
class Candidates:
    """The continuations scored at one step: the response text with each candidate, and its length."""

    texts: Sequence[str]
    num_tokens: Sequence[int]
    ended: Sequence[bool]
    """True for a candidate that ends the response (end of sequence)."""


def rule_rewards(rules: RulesReward, candidates: Candidates) -> np.ndarray:
    """The rules' reward of every candidate."""
    flags = 0 if rules.case_sensitive else re.IGNORECASE
    keyword_patterns = [(re.compile(re.escape(k), flags), 1.0) for k in rules.include if k]
    keyword_patterns += [(re.compile(re.escape(k), flags), -1.0) for k in rules.avoid if k]
    regexes = [(re.compile(r.pattern), r.reward) for r in rules.regex]
    out = np.zeros(len(candidates.texts))
    for i, text in enumerate(candidates.texts):
        total = 0.0
        for pattern, value in keyword_patterns + regexes:
            if pattern.search(text):
                total += value
        if rules.length is not None:
            target = rules.length.target_tokens
            n = candidates.num_tokens[i]
            if rules.length.mode == "at_most":
                total -= max(0, n - target) / target
            elif candidates.ended[i]:
                total -= max(0, target - n) / target
        out[i] = total
    return out


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """``log(1 / (1 + exp(-x)))``, computed stably."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def combine_rewards(
    values: Sequence[np.ndarray],
    sources: Sequence[ModelReward | ImplicitReward | RulesReward],
    mode: Literal["sum", "log_sigmoid"],
) -> np.ndarray:
    """Combine per-source reward vectors: weighted sum, or weighted sum of ``log sigmoid(r - reference)``."""
    total = np.zeros_like(np.asarray(values[0], dtype=np.float64))
    for value, source in zip(values, sources, strict=True):
        value = np.asarray(value, dtype=np.float64)
        term = value if mode == "sum" else log_sigmoid(value - source.reference)
        total = total + source.weight * term
    return total
