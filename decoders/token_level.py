"""The driver shared by token-level decoders: one loop, many ways to merge the roles' views.

A token-level decoder decides each output token from the roles' views at that position. A subclass of
:class:`TokenLevelDecoder` says which views it needs per role (:meth:`~TokenLevelDecoder.view_specs`),
optionally which further operations it needs once it has seen them (:meth:`~TokenLevelDecoder.extra_ops`,
e.g. rewards of the candidates), and how to merge everything into scores over the vocabulary or a candidate
set (:meth:`~TokenLevelDecoder.scores`). The driver owns everything else. Per output position, in order:

1. stop if the grammar constraint (``ctx.grammar``) has terminated;
2. ask every role for its view after its context (the role's prompt, or :meth:`role_prefix`, plus the
   output so far), then the decoder's extra operations;
3. merge into scores; mask the tokens the grammar forbids and add its ASAp log-weights;
4. choose: the argmax when the temperature is 0, else a draw from ``softmax(scores / T)`` after min-p,
   top-k and top-p (:func:`alignd.decoders.speculative.sampling_probs`) with ``ctx.rng``;
5. commit: the output role's end-of-sequence ends the output; otherwise the grammar advances, the token is
   detokenized, stop strings are checked (the text is cut where one starts), and an :class:`Emit` carries
   the token with its provenance (``reason``) and the decoder's own log-probability (log-softmax of the
   final scores at temperature 1) plus ``ctx.top_logprobs`` alternatives;
6. stop at ``max_tokens`` (finish reason ``length``).

Speculative draft-and-verify (params ``speculative: {draft_role, block_size}``, off by default) replaces
steps 2-4 for a block of positions: the draft role writes ``block_size`` tokens natively
(:class:`GenerateOp`) while every other role takes its view at the block's first position, then every other
role scores the rest of the block in one :class:`ScoreOp` (a block of ``n`` drafted tokens needs the views
after ``context + block[:i]`` for ``i < n``, so the ScoreOp covers ``block[1:n-1]`` from position 1),
the extra operations of all positions run in one batch, and the decoder decides each position in turn.
With temperature 0 the draft is greedy and a drafted token is kept while it equals the decoder's own
choice; at the first disagreement the decoder's choice is appended and the block ends, so the output is
identical to step-by-step decoding. When sampling, the draft samples at the decoder's temperature
(without min-p/top-k/top-p, so that its distribution ``q = softmax(view / T)`` is known exactly) and each
drafted token goes through speculative rejection sampling against the decoder's final distribution ``p``
at the same position (:func:`alignd.decoders.speculative.speculative_step`): the output is distributed
exactly as without speculation. With a grammar, the constraint is advanced through the draft to learn its
masks (needed before the extra operations) and rolled back before the decisions.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignd.decoders.contract import (
    Decoder,
    DecoderContext,
    DecoderError,
    DecoderParams,
    DecoderRun,
    EngineOp,
    Finish,
    GeneratedBlock,
    GenerateOp,
    GrammarConstraint,
    SamplingOptions,
    ScoreOp,
    StepView,
    ViewOp,
    ViewSpec,
)
from alignd.decoders.output_stream import OutputStream
from alignd.decoders.speculative import (
    log_softmax,
    prompt_lookup,
    sample_from,
    sampling_probs,
    speculative_step,
)

__all__ = [
    "Scores",
    "SpeculativeParams",
    "Step",
    "TokenLevelDecoder",
    "TokenLevelParams",
    "merge_view_specs",
    "merge_views",
    "token_text",
]

_MAX_SEED = 2**31 - 1


class SpeculativeParams(BaseModel):
    """Draft-and-verify settings; subclasses narrow ``draft_role`` to their own roles."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["draft_role", "ngram"] = Field(
        default="draft_role",
        description="Who drafts: 'draft_role' (that role writes blocks natively) or 'ngram' (prompt lookup: "
        "the tokens that followed the last n tokens' latest earlier occurrence in the prompt and output; no "
        "model time, pays where the output repeats its input).",
    )
    draft_role: str = Field(
        description="The role that drafts blocks natively (the one whose choice usually wins); unused by 'ngram'."
    )
    block_size: int = Field(
        default=8,
        ge=1,
        le=64,
        description="How many tokens a block drafts before verification.",
    )
    prompt_lookup_max: int = Field(default=4, ge=1, le=32, description="'ngram': the longest n-gram matched.")
    prompt_lookup_min: int = Field(default=2, ge=1, le=32, description="'ngram': the shortest n-gram matched.")

    @model_validator(mode="after")
    def _lookup_range(self) -> SpeculativeParams:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        return self


class TokenLevelParams(DecoderParams):
    """Base of token-level decoders' parameters: carries the speculative option."""

    speculative: SpeculativeParams | None = Field(
        default=None,
        description="Speculative draft-and-verify (lossless: same greedy output, same sampling "
        "distribution); "
        "off when null.",
    )


@dataclass(frozen=True)
class Step:
    """One output position being decided."""

    ctx: DecoderContext
    generated: tuple[int, ...]
    """The output tokens before this position (shared vocabulary)."""
    allowed: np.ndarray | None
    """The grammar's mask of allowed tokens (vocabulary-sized), or ``None`` without a grammar."""
    vocab_size: int


def _no_explanation(token_id: int) -> str:
    return "chosen"


@dataclass
class Scores:
    """A decoder's merged scores at one position (log-space; ``-inf`` marks excluded tokens).

    ``token_ids`` is ``None`` when ``logits`` covers the whole vocabulary (index = token id); otherwise
    ``logits[i]`` scores candidate ``token_ids[i]`` and every other token is excluded. ``explain`` turns a
    chosen token into the provenance reason of its :class:`Emit`.
    """

    logits: np.ndarray
    token_ids: np.ndarray | None = None
    explain: Callable[[int], str] = field(default=_no_explanation)

    def dense(self, vocab_size: int) -> np.ndarray:
        """The scores as a vocabulary-sized float64 vector, ``-inf`` outside the candidates."""
        logits = np.asarray(self.logits, dtype=np.float64)
        out = np.full(vocab_size, -np.inf)
        if self.token_ids is None:
            n = min(vocab_size, logits.shape[0])
            out[:n] = logits[:n]
        else:
            ids = np.asarray(self.token_ids, dtype=np.int64)
            inside = ids < vocab_size
            out[ids[inside]] = logits[inside]
        return out


def merge_view_specs(*specs: ViewSpec | None) -> ViewSpec:
    """The smallest view that contains all of ``specs``."""
    present = [s for s in specs if s is not None]
    if any(s.full for s in present):
        return ViewSpec(full=True)
    ids: list[int] = []
    for s in present:
        ids.extend(t for t in s.token_ids if t not in ids)
    return ViewSpec(top_k=max((s.top_k for s in present), default=0), token_ids=tuple(ids))


def merge_views(a: StepView, b: StepView) -> StepView:
    """One view holding what ``a`` and ``b`` (two views of the same position) hold; full wins."""
    if b.is_full:
        return b
    if a.is_full:
        return a
    assert a.token_ids is not None and b.token_ids is not None
    ids = np.concatenate([a.token_ids, b.token_ids])
    lps = np.concatenate([a.logprobs, b.logprobs])
    uniq, first = np.unique(ids, return_index=True)
    vals = lps[first]
    order = np.argsort(-vals, kind="stable")
    return StepView(logprobs=vals[order], token_ids=uniq[order])


def _reason(ctx: DecoderContext, scores: Scores, token_id: int) -> str:
    """The provenance reason of a chosen token; only a traced request reads reasons, so others skip the
    work (decoding token texts, formatting probabilities)."""
    return scores.explain(token_id) if ctx.trace else ""


def token_text(ctx: DecoderContext, role: str, token_id: int) -> str:
    """The text of one token in ``role``'s tokenizer, for provenance reasons."""
    try:
        return ctx.roles[role].tokenizer.decode([token_id])
    except (KeyError, ValueError, TypeError, IndexError):  # a reason must never break decoding
        return f"<{token_id}>"


def _fit_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[0] == vocab_size:
        return mask
    out = np.zeros(vocab_size, dtype=bool)
    n = min(vocab_size, mask.shape[0])
    out[:n] = mask[:n]
    return out


def _fit_weights(weights: np.ndarray, vocab_size: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape[0] == vocab_size:
        return weights
    out = np.full(vocab_size, -np.inf)
    n = min(vocab_size, weights.shape[0])
    out[:n] = weights[:n]
    return out


@dataclass
class _Target:
    """The final distribution at one position: masked, grammar-weighted scores and sampling probabilities.

    Over the whole vocabulary (``ids`` is ``None``), or over candidates only: ``logits[i]`` and ``probs[i]``
    then belong to token ``ids[i]``, in ascending token order (so ties resolve to the lowest token id, as a
    vocabulary-sized vector's would) and every other token is excluded."""

    logits: np.ndarray
    probs: np.ndarray | None
    scores: Scores
    ids: np.ndarray | None = None

    def token_at(self, index: int) -> int:
        """The token id at ``index`` of :attr:`logits`."""
        return index if self.ids is None else int(self.ids[index])

    def index_of(self, token: int) -> int | None:
        """Where ``token`` is in :attr:`logits`, ``None`` for an excluded candidate."""
        if self.ids is None:
            return token if 0 <= token < self.logits.shape[0] else None
        pos = int(np.searchsorted(self.ids, token))
        return pos if pos < self.ids.size and int(self.ids[pos]) == token else None

    def dense_probs(self, vocab_size: int) -> np.ndarray:
        """The sampling probabilities as a vocabulary-sized vector."""
        assert self.probs is not None
        if self.ids is None:
            return self.probs
        out = np.zeros(vocab_size)
        out[self.ids] = self.probs
        return out


@dataclass
class _Run:
    """Per-choice state of one :meth:`TokenLevelDecoder.run`."""

    ctx: DecoderContext
    vocab_size: int
    eos: frozenset[int]
    wants: dict[str, ViewSpec]
    prefixes: dict[str, tuple[int, ...]]
    temperature: float
    grammar: GrammarConstraint | None
    stream: OutputStream
    drop_tail: re.Pattern[str] | None
    generated: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def remaining(self) -> int:
        return self.ctx.max_tokens - len(self.generated)

    def context(self, role: str, extra: Sequence[int] = ()) -> tuple[int, ...]:
        return self.prefixes[role] + tuple(self.generated) + tuple(extra)


_Sub = Generator[Any, Any, Any]


class TokenLevelDecoder(Decoder):
    """Base class of decoders whose choice at a position is a function of the roles' views there.

    Subclasses implement :meth:`view_specs` and :meth:`scores` (and, when they need more than views,
    :meth:`extra_ops`); the step loop, sampling, grammar, stop conditions, provenance and speculative
    draft-and-verify are the driver's (see the module docstring for the order of the stages).
    """

    shared_vocab: ClassVar[bool] = True

    # ---- what subclasses provide -------------------------------------------------------------------

    @abstractmethod
    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        """The view each role must provide at every position (the same at every position)."""

    @abstractmethod
    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        """Merge the views (and the results of :meth:`extra_ops`, in order) into scores at ``step``."""

    def extra_ops(self, step: Step, views: Mapping[str, StepView]) -> list[EngineOp]:
        """Operations that depend on the views at ``step`` (rewards of candidates, for example)."""
        return []

    def refine(self, step: Step, views: Mapping[str, StepView]) -> dict[str, ViewSpec]:
        """More of the roles' views that :meth:`scores` needs at ``step`` to be exact, given ``views``.

        A decoder may ask :meth:`view_specs` for cheap partial views (the top-k) and name here, per position,
        what else it needs (specific token ids, or the full view); the driver fetches it at the same
        position and merges it into the views before :meth:`extra_ops` and :meth:`scores`. Empty (the
        default): the views are enough.
        """
        return {}

    def role_prefix(self, ctx: DecoderContext, role: str) -> tuple[int, ...]:
        """What ``role`` sees before the output: its prompt by default."""
        return tuple(ctx.roles[role].prompt_ids)

    def temperature(self, ctx: DecoderContext) -> float:
        """The sampling temperature of this run (0: greedy); the request's by default."""
        return float(ctx.sampling.temperature)

    def speculative_params(self, ctx: DecoderContext) -> SpeculativeParams | None:
        """Draft-and-verify settings for this run, ``None`` for step-by-step decoding."""
        return getattr(self.params, "speculative", None)

    def draft_is_target(self, ctx: DecoderContext) -> bool:
        """True when the decoder's distribution *is* the draft role's native one (nothing to verify)."""
        return False

    def stop_strings(self, ctx: DecoderContext) -> tuple[str, ...]:
        """Strings that end the output: the request's by default."""
        return tuple(ctx.stop_strings)

    def tail_to_drop(self, ctx: DecoderContext) -> re.Pattern[str] | None:
        """A pattern removed from the end of the output when it ends (no stop string), if any."""
        return None

    def check_context(self, ctx: DecoderContext) -> None:
        """Raise :class:`DecoderError` when the run cannot proceed (a role used but not assigned, ...)."""
        for role in self.view_specs(ctx):
            if role not in ctx.roles:
                raise DecoderError(
                    f"decoder {self.name!r} needs role {role!r}", param=f"alignment.roles.{role}"
                )

    # ---- the driver --------------------------------------------------------------------------------

    def run(self, ctx: DecoderContext) -> DecoderRun:
        """Decode one choice (see the module docstring for the stages)."""
        r = self._start(ctx)
        spec = self.speculative_params(ctx)
        while r.remaining > 0:
            if r.grammar is not None and r.grammar.is_terminated():
                return (yield from self._end(r, "stop"))
            if spec is not None:
                finish = yield from self._speculative_block(r, spec)
            else:
                finish = yield from self._single_step(r)
            if finish is not None:
                return finish
        return (yield from self._end(r, "length"))

    def _start(self, ctx: DecoderContext) -> _Run:
        self.check_context(ctx)
        out = self.output_role()
        if out not in ctx.roles:
            raise DecoderError(f"decoder {self.name!r} needs role {out!r}", param=f"alignment.roles.{out}")
        rc = ctx.roles[out]
        wants = dict(self.view_specs(ctx))
        spec = self.speculative_params(ctx)
        roles = set(wants) | {out}
        if spec is not None and spec.method == "draft_role":
            roles.add(spec.draft_role)
        for role in roles:
            if role not in ctx.roles:
                raise DecoderError(
                    f"decoder {self.name!r} needs role {role!r}", param=f"alignment.roles.{role}"
                )
        prefixes = {role: self.role_prefix(ctx, role) for role in roles}
        for role, prefix in prefixes.items():
            if not prefix:
                raise DecoderError(f"role {role!r} has an empty prompt", param="prompt")
        return _Run(
            ctx=ctx,
            vocab_size=rc.vocab_size,
            eos=frozenset(rc.eos_token_ids),
            wants=wants,
            prefixes=prefixes,
            temperature=self.temperature(ctx),
            grammar=ctx.grammar,
            stream=OutputStream(rc.tokenizer, out, self.stop_strings(ctx), rc.prompt_ids),
            drop_tail=self.tail_to_drop(ctx),
        )

    def _end(self, r: _Run, reason: str) -> _Sub:
        yield from r.stream.finish(r.drop_tail)
        if r.grammar is not None:
            r.grammar.finish()
        return Finish(reason)  # type: ignore[arg-type]

    def _mask(self, r: _Run) -> np.ndarray | None:
        if r.grammar is None:
            return None
        return _fit_mask(r.grammar.allowed_mask(), r.vocab_size)

    def _target(self, r: _Run, step: Step, scores: Scores) -> _Target:
        if scores.token_ids is not None and step.allowed is None:
            return self._candidate_target(r, step, scores)
        logits = scores.dense(r.vocab_size)
        if step.allowed is not None:
            raw = log_softmax(logits)
            logits = np.where(step.allowed, logits, -np.inf)
            weights = r.grammar.log_weights(step.allowed, raw) if r.grammar is not None else None
            if weights is not None:
                logits = logits + _fit_weights(weights, r.vocab_size)
        if not np.isfinite(logits).any():
            raise self._no_token(step)
        return _Target(logits, self._probs(r, logits), scores)

    def _candidate_target(self, r: _Run, step: Step, scores: Scores) -> _Target:
        """The target over the candidates of ``scores`` alone (no grammar): the same choices, log-probabilities
        and draws as over the whole vocabulary, without a vocabulary-sized pass per token."""
        ids = np.asarray(scores.token_ids, dtype=np.int64)
        logits = np.asarray(scores.logits, dtype=np.float64)
        inside = ids < r.vocab_size
        ids, logits = ids[inside], logits[inside]
        order = np.argsort(ids, kind="stable")
        ids, logits = ids[order], logits[order]
        if not np.isfinite(logits).any():
            raise self._no_token(step)
        return _Target(logits, self._probs(r, logits), scores, ids)

    def _probs(self, r: _Run, logits: np.ndarray) -> np.ndarray | None:
        """The sampling distribution over ``logits`` (``None`` when greedy)."""
        if r.greedy:
            return None
        s = r.ctx.sampling
        return sampling_probs(logits, r.temperature, s.top_p, s.top_k, s.min_p)

    def _no_token(self, step: Step) -> DecoderError:
        return DecoderError(f"decoder {self.name!r} found no allowed token at output position {len(step.generated)}")

    def _choose(self, r: _Run, target: _Target) -> int:
        if target.probs is None:
            return target.token_at(int(np.argmax(target.logits)))
        return target.token_at(sample_from(target.probs, r.ctx.rng))

    def _commit(
        self, r: _Run, token: int, reason: str, target: _Target | None, view: StepView | None = None
    ) -> _Sub:
        """Append one decided token (or end on EOS); returns a :class:`Finish` when the output is over."""
        if token in r.eos:
            return (yield from self._end(r, "stop"))
        if r.grammar is not None:
            r.grammar.advance(token)
        r.generated.append(token)
        logprob, top = self._report(r, token, target, view)
        yield from r.stream.push(token, reason, logprob, top)
        if r.stream.stopped:
            if r.grammar is not None:
                r.grammar.finish()
            return Finish("stop")
        if r.remaining <= 0:
            return (yield from self._end(r, "length"))
        return None

    def _report(
        self, r: _Run, token: int, target: _Target | None, view: StepView | None
    ) -> tuple[float | None, dict[int, float] | None]:
        n = r.ctx.top_logprobs
        if target is not None:
            logp = log_softmax(target.logits)
            top = None
            if n > 0:
                order = np.argsort(-logp, kind="stable")[:n]
                top = {target.token_at(int(i)): float(logp[i]) for i in order if np.isfinite(logp[i])}
            at = target.index_of(token)
            return (float(logp[at]) if at is not None else -np.inf), top
        if view is None:
            return None, None
        lp = view.logprob_of(token)
        top = None
        if n > 0:
            if view.token_ids is None:
                order = np.argsort(-view.logprobs, kind="stable")[:n]
                top = {int(t): float(view.logprobs[t]) for t in order}
            else:
                top = {int(t): float(v) for t, v in list(zip(view.token_ids, view.logprobs, strict=True))[:n]}
        return (float(lp) if np.isfinite(lp) else None), top

    # ---- one position at a time ----------------------------------------------------------------------

    def _single_step(self, r: _Run) -> _Sub:
        allowed = self._mask(r)
        roles = list(r.wants)
        results = (yield [ViewOp(role, r.context(role), r.wants[role]) for role in roles]) if roles else []
        views = dict(zip(roles, results, strict=True))
        step = Step(r.ctx, tuple(r.generated), allowed, r.vocab_size)
        more = self.refine(step, views)
        if more:
            added = yield [ViewOp(role, r.context(role), want) for role, want in more.items()]
            views.update({role: merge_views(views[role], v) for role, v in zip(more, added, strict=True)})
        extra = self.extra_ops(step, views)
        extra_results = list((yield extra)) if extra else []
        target = self._target(r, step, self.scores(step, views, extra_results))
        token = self._choose(r, target)
        return (yield from self._commit(r, token, _reason(r.ctx, target.scores, token), target))

    # ---- speculative draft-and-verify ------------------------------------------------------------------

    def _speculative_block(self, r: _Run, spec: SpeculativeParams) -> _Sub:
        if spec.method == "ngram":
            return (yield from self._lookup_block(r, spec))
        draft = spec.draft_role
        size = min(spec.block_size, r.remaining)
        native = self.draft_is_target(r.ctx) and r.grammar is None
        seed = int(r.ctx.rng.integers(_MAX_SEED))
        if native:
            s = r.ctx.sampling
            # a fresh seed per block (drawn from the request's seeded rng): reproducible, never repeating
            sampling = SamplingOptions(s.temperature, s.top_p, s.top_k, s.min_p, seed)
            want = ViewSpec(top_k=max(1, r.ctx.top_logprobs))
        elif r.greedy:
            sampling = SamplingOptions()
            want = merge_view_specs(r.wants.get(draft), ViewSpec(top_k=1))
        else:
            # q must be known exactly: temperature only, and the draft's full view
            sampling = SamplingOptions(temperature=r.temperature, seed=seed)
            want = ViewSpec(full=True)
        # the other roles' views at the block's first position are fetched while the draft writes
        others = [] if native else [role for role in r.wants if role != draft]
        results = yield [
            GenerateOp(draft, r.context(draft), size, want, sampling),
            *(ViewOp(role, r.context(role), r.wants[role]) for role in others),
        ]
        block: GeneratedBlock = results[0]
        tokens = list(block.token_ids)
        if not tokens:
            if native and block.finished:
                return (yield from self._end(r, "stop"))
            return (yield from self._single_step(r))
        if native:
            return (yield from self._accept_native(r, draft, block))
        return (yield from self._verify_block(r, draft, block, dict(zip(others, results[1:], strict=True))))

    def _accept_native(self, r: _Run, draft: str, block: GeneratedBlock) -> _Sub:
        reason = f"{self.name}: {draft} wrote natively"
        for token, view in zip(block.token_ids, block.views, strict=True):
            finish = yield from self._commit(r, int(token), reason, None, view)
            if finish is not None:
                return finish
        if block.finished:  # the role stopped on its own without returning its end token
            return (yield from self._end(r, "stop"))
        return None

    def _lookup_block(self, r: _Run, spec: SpeculativeParams) -> _Sub:
        """A block drafted by prompt lookup: every role scores it as one chunk from the block's first position
        to the position after it, which gives one more token when the whole block is kept."""
        history = r.prefixes[self.output_role()] + tuple(r.generated)
        size = min(spec.block_size, r.remaining - 1)  # leave room for the position after the block
        tokens = prompt_lookup(history, spec.prompt_lookup_min, spec.prompt_lookup_max, size)
        roles = list(r.wants)
        if not tokens or not roles:
            return (yield from self._single_step(r))
        ops = [ScoreOp(role, r.context(role, tokens), len(r.context(role)), r.wants[role]) for role in roles]
        scored = list((yield ops))
        views_at = [{role: scored[j][i] for j, role in enumerate(roles)} for i in range(len(tokens) + 1)]
        return (yield from self._decide_block(r, tokens, views_at, None, "prompt lookup"))

    def _verify_block(self, r: _Run, draft: str, block: GeneratedBlock, first: dict[str, StepView]) -> _Sub:
        """Decide the drafted block's positions in turn; ``first`` holds the other roles' views at its first."""
        tokens = [int(t) for t in block.token_ids]
        n = len(tokens)
        others = list(first)
        ops: list[EngineOp] = [
            ScoreOp(role, r.context(role, tokens[: n - 1]), len(r.context(role)) + 1, r.wants[role])
            for role in others
        ] if n > 1 else []
        scored = list((yield ops)) if ops else []
        views_at: list[dict[str, StepView]] = []
        for i in range(n):
            views = {role: first[role] if i == 0 else scored[j][i - 1] for j, role in enumerate(others)}
            if draft in r.wants:
                views[draft] = block.views[i]
            views_at.append(views)
        return (yield from self._decide_block(r, tokens, views_at, block.views, draft))

    def _decide_block(
        self,
        r: _Run,
        tokens: list[int],
        views_at: list[dict[str, StepView]],
        draft_views: Sequence[StepView] | None,
        drafter: str,
    ) -> _Sub:
        """Decide a drafted block's positions in turn, up to the first replaced token.

        ``views_at[i]`` holds the roles' views at the block's position ``i``; one more than ``tokens`` is the
        position after the block, decided when the whole block is kept. ``draft_views`` are the draft's own
        views (its sampling distribution ``q``), ``None`` for a draft that proposes tokens outright (``q``
        one-hot); ``drafter`` names the draft in provenance reasons."""
        masks = self._draft_masks(r, tokens, after=len(views_at) > len(tokens))
        steps = [
            Step(r.ctx, tuple(r.generated) + tuple(tokens[:i]), masks[i], r.vocab_size)
            for i in range(len(masks))
        ]
        wanted = [(i, role, want) for i, step in enumerate(steps) for role, want in self.refine(step, views_at[i]).items()]
        if wanted:
            added = yield [ViewOp(role, r.context(role, tokens[:i]), want) for i, role, want in wanted]
            for (i, role, _), v in zip(wanted, added, strict=True):
                views_at[i][role] = merge_views(views_at[i][role], v)
        per_position = [self.extra_ops(steps[i], views_at[i]) for i in range(len(steps))]
        flat = [op for ops_i in per_position for op in ops_i]
        flat_results = list((yield flat)) if flat else []
        extras: list[list[Any]] = []
        pos = 0
        for ops_i in per_position:
            extras.append(flat_results[pos : pos + len(ops_i)])
            pos += len(ops_i)
        for i, step in enumerate(steps):
            if r.grammar is not None and r.grammar.is_terminated():
                return (yield from self._end(r, "stop"))
            target = self._target(r, step, self.scores(step, views_at[i], extras[i]))
            if i == len(tokens):  # the position after a block kept whole
                choice = self._choose(r, target)
                return (yield from self._commit(r, choice, _reason(r.ctx, target.scores, choice), target))
            drafted = tokens[i]
            if target.probs is None:
                choice = self._choose(r, target)
                kept = choice == drafted
            else:
                if draft_views is None:
                    q = np.zeros(r.vocab_size)
                    q[drafted] = 1.0
                else:
                    q = sampling_probs(draft_views[i].dense(r.vocab_size), r.temperature)
                kept, choice = speculative_step(target.dense_probs(r.vocab_size), q, drafted, r.ctx.rng)
            reason = _reason(r.ctx, target.scores, choice)
            if r.ctx.trace:
                shown = token_text(r.ctx, self.output_role(), drafted)
                reason += f" [drafted by {drafter}, kept]" if kept else f" [replaces {drafter}'s draft {shown!r}]"
            finish = yield from self._commit(r, choice, reason, target)
            if finish is not None or not kept:
                return finish
        return None

    def _draft_masks(self, r: _Run, tokens: list[int], after: bool = False) -> list[np.ndarray | None]:
        """The grammar's mask at each drafted position it can reach (advance through the draft, roll back);
        with ``after``, also at the position after the block when it is reached."""
        if r.grammar is None:
            return [None] * (len(tokens) + after)
        masks: list[np.ndarray | None] = []
        advanced = 0
        try:
            for token in tokens:
                mask = _fit_mask(r.grammar.allowed_mask(), r.vocab_size)
                masks.append(mask)
                if token in r.eos or not mask[token]:
                    break  # the decision here ends the block: later positions are never reached
                r.grammar.advance(token)
                advanced += 1
            else:
                if after and not r.grammar.is_terminated():
                    masks.append(_fit_mask(r.grammar.allowed_mask(), r.vocab_size))
        finally:
            if advanced:
                r.grammar.rollback(advanced)
        return masks
