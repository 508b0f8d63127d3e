"""The ``grammar`` decoder: one model, one position at a time, under a grammar (plain or ASAp).

Per position it asks the base for the raw log-probabilities of the tokens the grammar allows (only those
ids when at most 128 are allowed, the full vocabulary otherwise: exact either way), masks, reweights by
the learnt expected future grammaticality in ``asap`` mode, then picks greedily (``temperature == 0``) or
samples with the request's sampling options. The grammar comes, in this order, from the recipe's params,
from ``ctx.extra["grammar_spec"]`` (a :class:`GrammarSpec` the server parsed from ``response_format``),
or from ``ctx.grammar`` (a constraint the server built); the first two are compiled here with the
recipe's ``mode``. ASAp tries live in ``ctx.extra["grammar_store"]`` when the server shares one, else in
the decoder instance's own :class:`TrieStore` (one per recipe).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from alignd.decoders.contract import (
    Decoder,
    DecoderContext,
    DecoderError,
    DecoderParams,
    DecoderRun,
    Finish,
    GrammarConstraint,
    RoleSpec,
    ViewOp,
    ViewSpec,
)
from alignd.decoders.grammar.asap import TrieStore
from alignd.decoders.grammar.factory import build_grammar
from alignd.decoders.grammar.spec import GrammarSpec
from alignd.decoders.grammar.vocab import GrammarVocab
from alignd.decoders.output_stream import OutputStream
from alignd.decoders.speculative import log_softmax, sample_from, sampling_probs

__all__ = ["MAX_TOKEN_IDS_VIEW", "GrammarAligned", "GrammarParams", "choose_token"]

MAX_TOKEN_IDS_VIEW = 128
"""Above this many allowed tokens the decoder asks for the full vocabulary instead of their ids."""

_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "choice", "json_object")


class GrammarParams(DecoderParams):
    """Parameters of the ``grammar`` decoder. Give at most one grammar; with none, the request's
    ``response_format`` supplies it."""

    mode: Literal["constrained", "asap"] = Field(
        "constrained",
        description="constrained: mask and renormalise; asap: also reweight by learnt expected future "
        "grammaticality so repeated samples converge to the model's distribution given the grammar",
    )
    json_schema: dict[str, Any] | str | None = Field(None, description="a JSON schema")
    regex: str | None = Field(None, description="a regular expression the whole output matches")
    ebnf: str | None = Field(None, description="a GBNF/EBNF grammar with a root rule")
    choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    json_object: bool = Field(False, description="the output is any JSON object")
    backend: Literal["xgrammar", "llguidance"] = Field("xgrammar", description="grammar engine")
    pure_sampling: bool = Field(
        False,
        description="asap: sample at temperature 1 without top-k/top-p/min-p whatever the request says "
        "(the condition under which ASAp converges to the exact conditional distribution)",
    )

    @model_validator(mode="after")
    def _one_grammar(self) -> GrammarParams:
        given = [f for f in _GRAMMAR_FIELDS if getattr(self, f) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one grammar, got {', '.join(given)}")
        spec = self.spec()
        if spec is not None:
            GrammarSpec.model_validate(spec.model_dump())  # value checks (valid JSON, non-empty, ...)
        return self

    def spec(self) -> GrammarSpec | None:
        """The grammar these params give, or ``None``."""
        if self.json_schema is not None:
            return GrammarSpec(kind="json_schema", value=self.json_schema, mode=self.mode)
        if self.regex is not None:
            return GrammarSpec(kind="regex", value=self.regex, mode=self.mode)
        if self.ebnf is not None:
            return GrammarSpec(kind="ebnf", value=self.ebnf, mode=self.mode)
        if self.choice is not None:
            return GrammarSpec(kind="choice", value=self.choice, mode=self.mode)
        if self.json_object:
            return GrammarSpec(kind="json_object", mode=self.mode)
        return None


def choose_token(scores: np.ndarray, ctx: DecoderContext, pure: bool = False) -> tuple[int, np.ndarray]:
    """Pick the next token from log-space ``scores`` (``-inf`` = excluded).

    Returns the token and the normalised distribution it was judged by (before temperature and
    truncation: the decoder's own log-probabilities). Greedy when the request's temperature is 0 and
    ``pure`` is off; otherwise samples with the request's options, or at T=1 untruncated when ``pure``.
    """
    logq = log_softmax(scores)
    s = ctx.sampling
    if pure:
        return sample_from(np.exp(logq), ctx.rng), logq
    if s.temperature <= 0.0:
        return int(np.argmax(scores)), logq
    probs = sampling_probs(scores, s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p)
    return sample_from(probs, ctx.rng), logq


class GrammarAligned(Decoder):
    """Grammar-aligned decoding (Park et al. 2024): plain constrained decoding or ASAp on one model."""

    name: ClassVar[str] = "grammar"
    description: ClassVar[str] = (
        "Output always matches a JSON schema, regex, EBNF grammar or choice list; mode 'asap' samples from "
        "the model's distribution conditioned on the grammar (converging over repeated samples)."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (RoleSpec("base", "the model that writes under the grammar"),)
    params_model: ClassVar[type[DecoderParams]] = GrammarParams
    shared_vocab: ClassVar[bool] = True

    def __init__(self, params: DecoderParams, store: TrieStore | None = None) -> None:
        super().__init__(params)
        self.store = store if store is not None else TrieStore()
        """ASAp tries of this recipe (used when the server does not pass a shared store)."""

    @property
    def p(self) -> GrammarParams:
        """The validated parameters."""
        assert isinstance(self.params, GrammarParams)
        return self.params

    def constraint(self, ctx: DecoderContext) -> GrammarConstraint:
        """The grammar constraint for one choice (see the module docstring for where it comes from)."""
        spec = self.p.spec()
        external = ctx.extra.get("grammar_spec")
        if spec is not None and (external is not None or ctx.grammar is not None):
            raise DecoderError(
                "the recipe already fixes a grammar; drop response_format", param="response_format"
            )
        if spec is None and external is not None:
            if not isinstance(external, GrammarSpec):
                raise TypeError("ctx.extra['grammar_spec'] must be a GrammarSpec")
            spec = external.model_copy(update={"mode": self.p.mode})
        if spec is None:
            if ctx.grammar is not None:
                return ctx.grammar
            raise DecoderError(
                "the grammar decoder needs a grammar: set one of params "
                f"{', '.join(_GRAMMAR_FIELDS)} or the request's response_format",
                param="alignment.params",
            )
        base = ctx.roles["base"]
        vocab = ctx.extra.get("grammar_vocab")
        if not isinstance(vocab, GrammarVocab):
            vocab = GrammarVocab.for_tokenizer(base.tokenizer, base.vocab_size, base.eos_token_ids)
        store = ctx.extra.get("grammar_store")
        if store is None:
            store = self.store
        return build_grammar(
            spec, vocab, store=store, model=base.model, prompt_ids=base.prompt_ids, backend=self.p.backend
        )

    def run(self, ctx: DecoderContext) -> DecoderRun:
        """Decode one choice under the grammar."""
        grammar = self.constraint(ctx)
        base = ctx.roles["base"]
        vocab_size = base.vocab_size
        eos = base.eos_token_ids
        pure = self.p.pure_sampling and self.p.mode == "asap"
        out = OutputStream(base.tokenizer, "base", ctx.stop_strings, base.prompt_ids)
        context = list(base.prompt_ids)
        reason = f"grammar ({self.p.mode})"
        try:
            for _ in range(ctx.max_tokens):
                allowed = grammar.allowed_mask()
                allowed_ids = np.flatnonzero(allowed)
                if allowed_ids.size == 0:
                    return Finish("stop")  # EOS was accepted (or the grammar admits nothing more)
                if allowed_ids.size <= MAX_TOKEN_IDS_VIEW:
                    want = ViewSpec(token_ids=tuple(int(t) for t in allowed_ids))
                else:
                    want = ViewSpec(full=True)
                (view,) = yield [ViewOp("base", tuple(context), want)]
                raw = view.dense(vocab_size)
                scores = np.where(allowed, raw, -np.inf)
                weights = grammar.log_weights(allowed, raw)
                if weights is not None:
                    scores = scores + np.where(allowed, weights, 0.0)
                if not np.isfinite(scores).any():
                    # the model gives every allowed token probability 0 (underflow): pick among them evenly
                    scores = np.where(allowed, 0.0, -np.inf)
                token, logq = choose_token(scores, ctx, pure)
                grammar.advance(token)
                if token in eos:
                    for e in out.finish():
                        yield e
                    return Finish("stop")
                tops = _top_logprobs(logq, ctx.top_logprobs) if ctx.top_logprobs else None
                for e in out.push(token, reason, float(logq[token]), tops):
                    yield e
                context.append(token)
                if out.stopped:
                    return Finish("stop")
            for e in out.finish():
                yield e
            return Finish("length")
        finally:
            grammar.finish()


def _top_logprobs(logq: np.ndarray, n: int) -> dict[int, float]:
    finite = np.flatnonzero(np.isfinite(logq))
    if finite.size > n:
        finite = finite[np.argpartition(logq[finite], -n)[-n:]]
    order = finite[np.argsort(-logq[finite], kind="stable")]
    return {int(t): float(logq[t]) for t in order}
