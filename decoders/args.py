"""ARGS: alignment as reward-guided search (Khanov et al., "ARGS: Alignment as Reward-Guided Search").

At each position the base model's ``k`` most likely tokens are the candidates; each is scored::

    score(c) = log p_base(c) + w * reward(prefix + c)

and greedy decoding takes the best candidate, sampling draws from ``softmax(score / T)`` over the
candidates. ``reward`` combines one or more sources (:mod:`alignd.decoders.rewards`): a reward model (all
``k`` candidates of a step in ONE :class:`RewardOp`, with the prompt shared; the reference implementation
copies the reward model's cache ``k`` times per step instead), the implicit reward of an aligned/reference
pair (one view per role restricted to the candidates), programmatic rules; by weighted sum or the
log-sigmoid transform of Wang et al.

What "logit" means: the reference code (deeplearning-wisc/args, ``argsearch.py``) adds ``w * reward`` to
the base's raw *logits* (``mout.logits[:, -1]``, before any softmax). alignd adds it to the base's raw
*log-probabilities*, which differ from the logits by one constant per position (the log partition
function): the ranking of the candidates and ``softmax(score / T)`` over them are identical, so both read
the paper's formula the same way.

Other differences from the reference: it never stops (it always writes ``max_new_token`` tokens); alignd
stops at the base's end-of-sequence token and at stop strings. Its reward model reads the base tokenizer's
ids of prompt + response; alignd sends text pairs (``prompt text``, ``response text with the candidate``) so
the reward model may use its own tokenizer (the prompt text is the reward role's ``prompt_text`` when the
server sets one, else the base's). With a grammar constraint the candidates are the ``k`` most likely
*allowed* tokens (the base's full view is read then).

``temperature``: with a request temperature of 0 ARGS is greedy; otherwise it samples at this temperature
(0.7, the paper's setting), or at the request's when ``temperature`` is null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from alignd.decoders.contract import (
    DecoderContext,
    DecoderError,
    EngineOp,
    RewardOp,
    RoleSpec,
    StepView,
    ViewOp,
    ViewSpec,
)
from alignd.decoders.rewards import (
    Candidates,
    ImplicitReward,
    ModelReward,
    RewardSource,
    RulesReward,
    combine_rewards,
    rule_rewards,
)
from alignd.decoders.token_level import (
    Scores,
    SpeculativeParams,
    Step,
    TokenLevelDecoder,
    TokenLevelParams,
    token_text,
)

__all__ = ["ARGS", "ARGSParams", "ARGSSpeculative"]


class ARGSSpeculative(SpeculativeParams):
    """Draft-and-verify for ARGS: the base drafts (its top-1 usually wins when rewards agree)."""

    draft_role: Literal["base"] = Field(default="base", description="The role that drafts blocks.")


class ARGSParams(TokenLevelParams):
    """Parameters of ARGS."""

    k: int = Field(default=10, ge=1, le=128, description="How many of the base's top tokens are candidates.")
    w: float = Field(
        default=1.0, ge=0.0, le=100.0, description="Weight of the reward against the log-probability."
    )
    temperature: float | None = Field(
        default=0.7,
        gt=0.0,
        le=10.0,
        description="Sampling temperature of softmax(score / T) when the request samples (temperature > 0); "
        "null: the request's temperature. A request temperature of 0 is greedy.",
    )
    rewards: list[RewardSource] = Field(
        default_factory=lambda: [ModelReward()],
        min_length=1,
        max_length=16,
        description="Reward sources: {'kind': 'model'} (role reward), {'kind': 'implicit'} "
        "(roles aligned and reference), {'kind': 'rules', ...}; each with a weight and a reference value.",
    )
    combine: Literal["sum", "log_sigmoid"] = Field(
        default="sum",
        description="'sum': weighted sum of rewards; 'log_sigmoid': weighted sum of "
        "log sigmoid(r - reference) "
        "(Wang et al.: good on every property).",
    )
    speculative: ARGSSpeculative | None = Field(  # type: ignore[assignment]
        default=None, description="Speculative draft-and-verify (lossless); off when null."
    )


_ROLES_OF = {"model": ("reward",), "implicit": ("aligned", "reference"), "rules": ()}


class ARGS(TokenLevelDecoder):
    """Reward-guided search over the base model's top-k candidates."""

    name: ClassVar[str] = "args"
    description: ClassVar[str] = (
        "ARGS (Khanov et al.): the base's top-k candidates scored "
        "log p_base + w * reward(prefix + candidate), "
        "with rewards from a reward model, an aligned/reference pair and rules."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (
        RoleSpec("base", "The model that proposes candidates and writes the output."),
        RoleSpec(
            "reward", "A sequence-classification reward model (for rewards of kind 'model').", "reward", True
        ),
        RoleSpec("aligned", "An aligned model (for the implicit reward).", optional=True),
        RoleSpec("reference", "The aligned model's reference (for the implicit reward).", optional=True),
    )
    params_model: ClassVar[type[ARGSParams]] = ARGSParams
    shared_vocab: ClassVar[bool] = True
    params: ARGSParams

    def check_context(self, ctx: DecoderContext) -> None:
        """Every role a reward source uses must be assigned."""
        super().check_context(ctx)
        for i, source in enumerate(self.params.rewards):
            for role in _ROLES_OF[source.kind]:
                if role not in ctx.roles:
                    raise DecoderError(
                        f"reward source {i} ({source.kind}) needs role {role!r}",
                        param=f"alignment.roles.{role}",
                    )

    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        """The base's top-k (its full view under a grammar, to find the top-k allowed tokens)."""
        if ctx.grammar is not None:
            return {"base": ViewSpec(full=True)}
        return {"base": ViewSpec(top_k=self.params.k)}

    def temperature(self, ctx: DecoderContext) -> float:
        """0 when the request is greedy, else ARGS' own temperature (or the request's)."""
        if ctx.sampling.temperature <= 0:
            return 0.0
        return float(self.params.temperature or ctx.sampling.temperature)

    def _candidates(self, step: Step, views: Mapping[str, StepView]) -> tuple[np.ndarray, np.ndarray]:
        """The base's ``k`` most likely (allowed) tokens, most likely first (ties: lowest id first), with their
        log-probabilities."""
        view = views["base"]
        if view.token_ids is not None and step.allowed is None:
            # a top-k view: sort its own entries, not a vocabulary-sized vector (the same order)
            ids, lps = view.finite_entries(step.vocab_size)
            order = np.lexsort((ids, -lps))[: self.params.k]
            return ids[order], lps[order]
        base = view.dense(step.vocab_size)
        if step.allowed is not None:
            base = np.where(step.allowed, base, -np.inf)
        order = np.argsort(-base, kind="stable")[: self.params.k]
        order = order[np.isfinite(base[order])]
        return order.astype(np.int64), base[order]

    def _texts(self, step: Step, candidates: np.ndarray) -> Candidates:
        base = step.ctx.roles["base"]
        eos = base.eos_token_ids
        prefix = list(step.generated)
        prefix_text = base.tokenizer.decode(prefix)
        texts, lengths, ended = [], [], []
        for c in candidates:
            c = int(c)
            if c in eos:
                texts.append(prefix_text)
                lengths.append(len(prefix))
                ended.append(True)
            else:
                texts.append(base.tokenizer.decode(prefix + [c]))
                lengths.append(len(prefix) + 1)
                ended.append(False)
        return Candidates(texts, lengths, ended)

    def _prompt_text(self, ctx: DecoderContext) -> str:
        reward = ctx.roles.get("reward")
        if reward is not None and reward.prompt_text:
            return reward.prompt_text
        base = ctx.roles["base"]
        return base.prompt_text or base.tokenizer.decode(base.prompt_ids)

    def extra_ops(self, step: Step, views: Mapping[str, StepView]) -> list[EngineOp]:
        """One RewardOp with every candidate (kind 'model'), and candidate views of aligned/reference."""
        candidates, _ = self._candidates(step, views)
        ids = tuple(int(c) for c in candidates)
        ops: list[EngineOp] = []
        kinds = {s.kind for s in self.params.rewards}
        if "model" in kinds:
            texts = self._texts(step, candidates).texts
            prompt = self._prompt_text(step.ctx)
            ops.append(RewardOp("reward", tuple((prompt, t) for t in texts)))
        if "implicit" in kinds:
            for role in ("aligned", "reference"):
                context = tuple(step.ctx.roles[role].prompt_ids) + step.generated
                ops.append(ViewOp(role, context, ViewSpec(token_ids=ids)))
        return ops

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        """``log p_base + w * reward`` of each candidate."""
        candidates, logp = self._candidates(step, views)
        kinds = {s.kind for s in self.params.rewards}
        results = list(extra)
        model_values = np.asarray(results.pop(0), dtype=np.float64) if "model" in kinds else None
        implicit_values = None
        if "implicit" in kinds:
            aligned, reference = results.pop(0), results.pop(0)
            implicit_values = np.array(
                [aligned.logprob_of(int(c)) - reference.logprob_of(int(c)) for c in candidates],
                dtype=np.float64,
            )
        texts = self._texts(step, candidates) if "rules" in kinds else None
        values = []
        for source in self.params.rewards:
            if isinstance(source, ModelReward):
                values.append(model_values)
            elif isinstance(source, ImplicitReward):
                values.append(implicit_values)
            else:
                assert isinstance(source, RulesReward) and texts is not None
                values.append(rule_rewards(source, texts))
        reward = combine_rewards(values, self.params.rewards, self.params.combine)  # type: ignore[arg-type]
        w = self.params.w
        logits = logp + w * reward
        ctx = step.ctx
        index = {int(c): i for i, c in enumerate(candidates)}

        def explain(token: int) -> str:
            i = index.get(token, 0)
            text = token_text(ctx, "base", token)
            head = f"args: chose {text!r} (logp {logp[i]:.2f} + w*r {w * reward[i]:+.2f})"
            if i == 0:
                return head + ", the base's top-1"
            return (
                head
                + f" over base top-1 {token_text(ctx, 'base', int(candidates[0]))!r}"
                + f" (w*r {w * reward[0]:+.2f})"
            )

        return Scores(logits, token_ids=candidates, explain=explain)
