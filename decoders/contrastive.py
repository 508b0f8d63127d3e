"""Contrastive decoding (Li et al., "Contrastive Decoding: Open-ended Text Generation as Optimization").

At each position, over the plausible tokens ``V_head = {x : p_expert(x) >= alpha * max_w p_expert(w)}``::

    score(x) = log p_expert(x) - beta * log p_amateur(x) / tau

and ``-inf`` elsewhere; greedy decoding takes the argmax, sampling draws from ``softmax(score / T)`` at
the request's temperature ``T`` (with its top-p/top-k/min-p). ``tau`` is the amateur's temperature:
``log p_amateur / tau`` differs from the log-probabilities of the amateur at temperature ``tau`` only by a
constant per position, which changes neither the argmax nor the softmax.

Differences from the reference code (XiangLi1999/ContrastiveDecoding, its patched ``generation_utils.py``):

* the plausibility constraint ``alpha`` applies in every mode; the reference sets ``relative_top = None``
  in greedy search and so forgets it there (the paper's objective always has it);
* the reference subtracts raw logits; alignd uses raw log-probabilities, which differ by a constant per
  position (same choices, same sampling distribution);
* with a grammar constraint, ``V_head`` is taken relative to the most likely *allowed* token.

``amateur_context``: ``"full"`` gives the amateur its whole prompt; ``"last_token"`` only the last prompt
token plus the output so far, as the reference's ``--ignore_prefix yes`` (its default, and the setting of
the paper's main results) does.

``formula: "acd"`` gives the prompt contrast of Adversarial Contrastive Decoding (Zhao et al.): the same
model under a safe system prompt (role ``expert``) and an adversarial one (role ``amateur``, a separate role
assignment with its own system prompt: the server's business), scored ``log p_safe - acd_alpha * log
p_adversarial`` (``beta`` and ``tau`` unused; the plausibility constraint still applies).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from alignd.decoders.contract import DecoderContext, RoleSpec, StepView, ViewSpec
from alignd.decoders.token_level import (
    Scores,
    SpeculativeParams,
    Step,
    TokenLevelDecoder,
    TokenLevelParams,
    token_text,
)

__all__ = ["Contrastive", "ContrastiveParams", "ContrastiveSpeculative", "contrastive_scores"]

_FLOOR = -1e4  # stands in for log 0 in the amateur's view (its tokens are then strongly preferred)


class ContrastiveSpeculative(SpeculativeParams):
    """Draft-and-verify for contrastive decoding: the expert usually wins, so it drafts by default."""

    draft_role: Literal["expert", "amateur"] = Field(
        default="expert", description="The role that drafts blocks."
    )


class ContrastiveParams(TokenLevelParams):
    """Parameters of contrastive decoding."""

    alpha: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Plausibility: only tokens with p_expert >= alpha * max p_expert are candidates "
        "(in every mode).",
    )
    beta: float = Field(default=1.0, ge=0.0, le=10.0, description="Weight of the amateur's log-probability.")
    tau: float = Field(default=0.5, gt=0.0, le=10.0, description="Temperature of the amateur.")
    amateur_context: Literal["full", "last_token"] = Field(
        default="full",
        description="What the amateur sees: its full prompt, or only the last prompt token (the paper's main "
        "results) plus the output so far.",
    )
    formula: Literal["cd", "acd"] = Field(
        default="cd",
        description="'cd': log p_expert - beta * log p_amateur / tau. "
        "'acd' (Adversarial Contrastive Decoding): "
        "log p_safe - acd_alpha * log p_adversarial, the amateur being the same model under an adversarial "
        "system prompt.",
    )
    acd_alpha: float = Field(
        default=0.5, ge=0.0, le=10.0, description="Weight of the adversarial role in 'acd'."
    )
    speculative: ContrastiveSpeculative | None = Field(  # type: ignore[assignment]
        default=None, description="Speculative draft-and-verify (lossless); off when null."
    )


def contrastive_scores(
    expert: np.ndarray,
    amateur: np.ndarray,
    alpha: float,
    coefficient: float,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """``expert - coefficient * amateur`` over the plausible head of ``expert``, ``-inf`` elsewhere.

    ``expert`` and ``amateur`` are vocabulary-sized log-probability vectors; ``coefficient`` is
    ``beta / tau`` (or ACD's alpha); ``allowed`` restricts the head to tokens a grammar allows.
    """
    base = expert if allowed is None else np.where(allowed, expert, -np.inf)
    finite = np.isfinite(base)
    if not finite.any():
        return np.full_like(expert, -np.inf)
    threshold = np.max(base) + (np.log(alpha) if alpha > 0 else -np.inf)
    head = finite & (base >= threshold)
    return np.where(head, expert - coefficient * _floored(amateur), -np.inf)


def _floored(amateur: np.ndarray) -> np.ndarray:
    """The amateur's log-probabilities with tokens it did not return at ``_FLOOR`` instead of ``-inf``."""
    return np.where(np.isfinite(amateur), amateur, _FLOOR)


class Contrastive(TokenLevelDecoder):
    """Contrastive decoding: the expert's choices, minus what the amateur would also say."""

    name: ClassVar[str] = "contrastive"
    description: ClassVar[str] = (
        "Contrastive decoding (Li et al.): log p_expert - beta * log p_amateur / tau over the expert's "
        "plausible tokens; or the prompt contrast of Adversarial Contrastive Decoding."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (
        RoleSpec("expert", "The stronger model (or the model under a safe system prompt, for 'acd')."),
        RoleSpec(
            "amateur",
            "A weaker model with the same vocabulary (or the same model under an adversarial prompt).",
        ),
    )
    params_model: ClassVar[type[ContrastiveParams]] = ContrastiveParams
    shared_vocab: ClassVar[bool] = True
    params: ContrastiveParams
    full_view_vocab: ClassVar[int] = 4096
    """Up to this vocabulary size both roles send full views (cheap); above it, top-k views and :meth:`refine`."""
    view_top_k: ClassVar[int] = 32
    """How many of each role's most likely tokens a partial view holds."""

    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        """Both roles' top-k on a large vocabulary (:meth:`refine` fetches what exactness still needs),
        their full distributions on a small one or without a plausibility constraint."""
        vocab = ctx.roles["expert"].vocab_size if "expert" in ctx.roles else 0
        if self.params.alpha <= 0 or vocab <= self.full_view_vocab:
            return {"expert": ViewSpec(full=True), "amateur": ViewSpec(full=True)}
        return {"expert": ViewSpec(top_k=self.view_top_k), "amateur": ViewSpec(top_k=self.view_top_k)}

    def refine(self, step: Step, views: Mapping[str, StepView]) -> dict[str, ViewSpec]:
        """What the top-k views lack for an exact objective: the expert's full view when its top-k may not
        hold the whole plausible head, else the amateur's log-probabilities of head tokens it did not
        return. Every token outside the expert's top-k is at most as likely as its last one, so the head
        is known once that last one falls below the threshold."""
        expert, amateur = views["expert"], views["amateur"]
        if expert.is_full:
            return {} if amateur.is_full else {"amateur": ViewSpec(full=True)}
        assert expert.token_ids is not None
        ids, lps = expert.token_ids, expert.logprobs
        inside = ids < step.vocab_size
        ids, lps = ids[inside], lps[inside]
        allowed = np.ones(ids.shape, dtype=bool) if step.allowed is None else step.allowed[ids]
        if not allowed.any() or ids.size == 0:
            return {"expert": ViewSpec(full=True), "amateur": ViewSpec(full=True)}
        threshold = float(np.max(lps[allowed])) + float(np.log(self.params.alpha))
        if ids.size < step.vocab_size and float(np.min(lps)) >= threshold:
            return {"expert": ViewSpec(full=True), "amateur": ViewSpec(full=True)}
        head = ids[allowed & (lps >= threshold)]
        if amateur.is_full:
            return {}
        have = {int(t) for t in (amateur.token_ids if amateur.token_ids is not None else ())}
        missing = sorted({int(t) for t in head} - have)
        if not missing:
            return {}
        if len(missing) > 128:
            return {"amateur": ViewSpec(full=True)}
        return {"amateur": ViewSpec(token_ids=tuple(missing))}

    def role_prefix(self, ctx: DecoderContext, role: str) -> tuple[int, ...]:
        """The amateur's prompt is cut to its last token with ``amateur_context='last_token'``."""
        prompt = tuple(ctx.roles[role].prompt_ids)
        if role == "amateur" and self.params.amateur_context == "last_token":
            return prompt[-1:]
        return prompt

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        """The contrastive objective at ``step``: over the plausible head's tokens alone when the expert's view
        is its top-k (on a large vocabulary), else over the whole vocabulary."""
        head = self._head(step, views["expert"])
        if head is not None:
            return self._head_scores(step, views, *head)
        p = self.params
        expert = views["expert"].dense(step.vocab_size)
        amateur = views["amateur"].dense(step.vocab_size)
        logits = contrastive_scores(expert, amateur, p.alpha, self._coefficient, step.allowed)
        base = expert if step.allowed is None else np.where(step.allowed, expert, -np.inf)
        return Scores(logits, explain=self._explainer(step, views, int(np.argmax(base))))

    @property
    def _coefficient(self) -> float:
        """The amateur's weight: ``beta / tau`` ('cd') or ACD's alpha."""
        p = self.params
        return p.beta / p.tau if p.formula == "cd" else p.acd_alpha

    def _explainer(self, step: Step, views: Mapping[str, StepView], top: int) -> Callable[[int], str]:
        """The provenance reason of a chosen token, given the expert's top-1 ``top``."""
        ctx, expert, amateur = step.ctx, views["expert"], views["amateur"]
        label = "contrastive" if self.params.formula == "cd" else "contrastive(acd)"

        def explain(token: int) -> str:
            p_expert = np.exp(expert.logprob_of(token))
            if token == top:
                return f"{label}: expert top-1 {token_text(ctx, 'expert', token)!r} kept (p_expert={p_expert:.3f})"
            return (
                f"{label}: expert top-1 {token_text(ctx, 'expert', top)!r} demoted "
                f"(p_amateur={np.exp(amateur.logprob_of(top)):.3f}); chose {token_text(ctx, 'expert', token)!r} "
                f"(p_expert={p_expert:.3f}, p_amateur={np.exp(amateur.logprob_of(token)):.3f})"
            )

        return explain

    def _head(self, step: Step, expert: StepView) -> tuple[np.ndarray, np.ndarray] | None:
        """The plausible head (token ids, expert log-probabilities) within the expert's partial view, ``None``
        for a full view. (Whether the view holds the model's whole head is :meth:`refine`'s business: the
        vocabulary-sized computation on the same views gives the same head.)"""
        if expert.token_ids is None or self.params.alpha <= 0:
            return None
        ids, lps = expert.finite_entries(step.vocab_size)
        if step.allowed is not None:
            allowed = step.allowed[ids]
            ids, lps = ids[allowed], lps[allowed]
        if not ids.size:
            return None
        head = lps >= float(np.max(lps)) + float(np.log(self.params.alpha))
        return ids[head], lps[head]

    def _head_scores(self, step: Step, views: Mapping[str, StepView], ids: np.ndarray, expert: np.ndarray) -> Scores:
        """:func:`contrastive_scores` over the head's tokens only (the same values; every other token is out)."""
        amateur = views["amateur"].logprobs_of(ids)
        logits = expert - self._coefficient * _floored(amateur)
        top = int(ids[expert == np.max(expert)].min())  # the lowest id among ties, as over the vocabulary
        return Scores(logits, token_ids=ids, explain=self._explainer(step, views, top))
