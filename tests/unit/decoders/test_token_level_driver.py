"""The token-level driver: step loop, sampling, stop conditions, grammar, provenance, speculative blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
from pydantic import Field, ValidationError
from scipy.stats import chisquare

from alignd.decoders.contract import (
    DecoderContext,
    DecoderError,
    GeneratedBlock,
    GenerateOp,
    RoleSpec,
    SamplingOptions,
    ScoreOp,
    StepView,
    ViewOp,
    ViewSpec,
)
from alignd.decoders.token_level import Scores, SpeculativeParams, Step, TokenLevelDecoder, TokenLevelParams
from tests.support.fake_models import CharTokenizer, ContractExecutor, FakeModel, make_context, random_model

V = 12
TOK = CharTokenizer(V, special=())
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}  # prompt-lookup drafts


class MixSpeculative(SpeculativeParams):
    draft_role: Literal["a", "b"] = "a"


class MixParams(TokenLevelParams):
    speculative: MixSpeculative | None = Field(default=None)  # type: ignore[assignment]


class Mix(TokenLevelDecoder):
    """Product of experts of roles ``a`` and ``b`` (score = log p_a + log p_b): a test decoder."""

    name: ClassVar[str] = "mix"
    description: ClassVar[str] = "test"
    roles: ClassVar[tuple[RoleSpec, ...]] = (RoleSpec("a", "first"), RoleSpec("b", "second"))
    params_model: ClassVar[type[MixParams]] = MixParams

    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        return {"a": ViewSpec(full=True), "b": ViewSpec(full=True)}

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        logits = views["a"].dense(step.vocab_size) + views["b"].dense(step.vocab_size)
        return Scores(logits, explain=lambda t: f"mix: chose {t}")


def mix(**params: Any) -> Mix:
    return Mix(Mix.parse_params(params))


def models(seed: int = 0) -> dict[str, FakeModel]:
    return {"a": random_model(V, 10 + seed), "b": random_model(V, 20 + seed)}


def context(**kw: Any) -> DecoderContext:
    kw.setdefault("eos", ())
    return make_context({"a": ([1, 2, 3], V), "b": ([4, 2, 3], V)}, TOK, **kw)


def expected_greedy(m: dict[str, FakeModel], max_tokens: int, eos: Sequence[int] = ()) -> list[int]:
    out: list[int] = []
    for _ in range(max_tokens):
        s = m["a"].logprobs((1, 2, 3, *out)) + m["b"].logprobs((4, 2, 3, *out))
        t = int(np.argmax(s))
        if t in eos:
            break
        out.append(t)
    return out


def test_greedy_follows_the_merged_argmax() -> None:
    m = models()
    result = ContractExecutor(m).run(mix(), context(max_tokens=10))
    assert result.tokens == expected_greedy(m, 10)
    assert result.finish.reason == "length"
    assert result.text == TOK.decode(result.tokens)
    assert all(isinstance(op, ViewOp) for op in result.ops)
    assert all(e.role == "a" and e.reason.startswith("mix: chose") for e in result.emits)


@pytest.mark.parametrize("speculative", [None, {"block_size": 3}])
def test_reasons_are_written_only_for_a_traced_request(speculative: dict | None) -> None:
    """Reasons only reach a client in the alignment trace: an untraced run never asks for them, and the
    tokens are the same."""
    asked: list[int] = []

    class Counting(Mix):
        def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
            logits = views["a"].dense(step.vocab_size) + views["b"].dense(step.vocab_size)
            return Scores(logits, explain=lambda t: asked.append(t) or f"mix: chose {t}")

    decoder = Counting(Counting.parse_params({"speculative": speculative}))
    plain = ContractExecutor(models()).run(decoder, context(max_tokens=10, trace=False))
    assert not asked and plain.emits and all(e.reason == "" for e in plain.emits)
    traced = ContractExecutor(models()).run(decoder, context(max_tokens=10))
    assert traced.tokens == plain.tokens and asked
    assert all(e.reason.startswith("mix: chose") for e in traced.emits)


def test_views_read_each_roles_own_prompt_plus_output() -> None:
    result = ContractExecutor(models()).run(mix(), context(max_tokens=3))
    views = result.ops_of(ViewOp)
    assert [op.context for op in views if op.role == "a"][-1] == (1, 2, 3, *result.tokens[:2])
    assert [op.context for op in views if op.role == "b"][-1] == (4, 2, 3, *result.tokens[:2])


def test_end_of_sequence_stops_and_is_not_emitted() -> None:
    m = models()
    free = expected_greedy(m, 10)
    eos = free[3]
    result = ContractExecutor(m).run(mix(), context(max_tokens=10, eos=[eos]))
    assert result.tokens == free[: free.index(eos)]
    assert result.finish.reason == "stop"


def test_stop_string_cuts_the_text() -> None:
    m = models()
    free = expected_greedy(m, 10)
    stop = TOK.decode(free[4:6])
    result = ContractExecutor(m).run(mix(), context(max_tokens=10, stop_strings=[stop]))
    full = TOK.decode(free)
    assert result.text == full[: full.index(stop)]
    assert result.finish.reason == "stop"


def test_logprobs_and_top_logprobs_are_the_decoders_own() -> None:
    m = models()
    result = ContractExecutor(m).run(mix(), context(max_tokens=4, top_logprobs=3))
    first = result.emits[0]
    merged = m["a"].logprobs((1, 2, 3)) + m["b"].logprobs((4, 2, 3))
    norm = merged - np.log(np.exp(merged).sum())
    assert first.logprobs == pytest.approx((norm[first.token_ids[0]],))
    assert len(first.top_logprobs[0]) == 3
    assert max(first.top_logprobs[0].values()) == pytest.approx(norm.max())


class Head(Mix):
    """The mix over its five best tokens only (scores rounded so that ties occur): as candidates with their
    ids, most likely first, or (``dense``) as the same scores over the whole vocabulary."""

    dense: ClassVar[bool] = False

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        merged = np.round(views["a"].dense(step.vocab_size) + views["b"].dense(step.vocab_size), 1)
        ids = np.argsort(-merged, kind="stable")[:5]
        if self.dense:
            out = np.full(step.vocab_size, -np.inf)
            out[ids] = merged[ids]
            return Scores(out)
        return Scores(merged[ids], token_ids=ids)


class DenseHead(Head):
    dense: ClassVar[bool] = True


@pytest.mark.parametrize("speculative", [None, {**NGRAM, "block_size": 3}])
@pytest.mark.parametrize(
    "sampling",
    [SamplingOptions(), SamplingOptions(temperature=1.0), SamplingOptions(temperature=0.7, top_k=3),
     SamplingOptions(temperature=1.3, top_p=0.8, min_p=0.05)],
)
def test_candidate_scores_decide_as_the_same_scores_over_the_vocabulary(
    sampling: SamplingOptions, speculative: dict | None
) -> None:
    """The driver decides over a decoder's candidates without a vocabulary-sized vector: the same tokens
    (ties to the lowest id, the same seeded draws), log-probabilities and top log-probabilities."""
    m = models()
    for seed in range(8):
        ctx = context(max_tokens=10, top_logprobs=3, sampling=sampling, seed=seed)
        params = Head.parse_params({"speculative": speculative})
        sparse = ContractExecutor(m).run(Head(params), ctx)
        ctx = context(max_tokens=10, top_logprobs=3, sampling=sampling, seed=seed)
        dense = ContractExecutor(m).run(DenseHead(params), ctx)
        assert sparse.tokens == dense.tokens
        for a, b in zip(sparse.emits, dense.emits, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-12)
            for ta, tb in zip(a.top_logprobs, b.top_logprobs, strict=True):
                assert list(ta) == list(tb)
                np.testing.assert_allclose(list(ta.values()), list(tb.values()), rtol=1e-12)


def test_missing_role_is_a_decoder_error() -> None:
    ctx = make_context({"a": ([1], V)}, TOK)
    with pytest.raises(DecoderError) as info:
        ContractExecutor(models()).run(mix(), ctx)
    assert info.value.param == "alignment.roles.b"


def test_params_reject_unknown_fields_and_bad_draft_roles() -> None:
    with pytest.raises(ValidationError):
        Mix.parse_params({"nope": 1})
    with pytest.raises(ValidationError):
        Mix.parse_params({"speculative": {"draft_role": "c"}})
    with pytest.raises(ValidationError):
        Mix.parse_params({"speculative": {"block_size": 0}})
    with pytest.raises(ValidationError):
        Mix.parse_params({"speculative": {"method": "medusa"}})
    with pytest.raises(ValidationError):
        Mix.parse_params({"speculative": {"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}})


# ---- grammar -----------------------------------------------------------------------------------------


class ParityGrammar:
    """A fake grammar: token parities must alternate (even first); after ``length`` tokens only EOS.

    ``weights`` (optional) adds ASAp-style log-weights; every call is recorded.
    """

    def __init__(self, eos: int, length: int = 4, weights: np.ndarray | None = None) -> None:
        self.eos = eos
        self.length = length
        self.weights = weights
        self.accepted: list[int] = []
        self.rollbacks: list[int] = []
        self.finished = 0
        self.weight_calls = 0

    def allowed_mask(self) -> np.ndarray:
        mask = np.zeros(V, dtype=bool)
        if len(self.accepted) >= self.length:
            mask[self.eos] = True
            return mask
        parity = len(self.accepted) % 2
        mask[[t for t in range(V) if t % 2 == parity and t != self.eos]] = True
        return mask

    def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> np.ndarray | None:
        self.weight_calls += 1
        assert np.isclose(np.exp(logprobs).sum(), 1.0), "the raw distribution is normalised"
        return self.weights

    def advance(self, token_id: int) -> None:
        if not self.allowed_mask()[token_id]:
            raise DecoderError(f"grammar refuses {token_id}")
        self.accepted.append(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.rollbacks.append(num_tokens)
        del self.accepted[len(self.accepted) - num_tokens :]

    def is_terminated(self) -> bool:
        return len(self.accepted) >= self.length

    def finish(self) -> None:
        self.finished += 1


@pytest.mark.parametrize(
    "speculative", [None, {"block_size": 3}, {"block_size": 8, "draft_role": "b"}, {**NGRAM, "block_size": 3}]
)
def test_grammar_masks_every_position_and_ends_the_output(speculative: dict | None) -> None:
    grammar = ParityGrammar(eos=V - 1)
    result = ContractExecutor(models()).run(
        mix(speculative=speculative), context(max_tokens=10, grammar=grammar, eos=[V - 1])
    )
    assert len(result.tokens) == 4
    assert [t % 2 for t in result.tokens] == [0, 1, 0, 1]
    assert grammar.accepted == result.tokens
    assert grammar.finished == 1
    assert result.finish.reason == "stop"


def test_grammar_output_is_the_same_with_and_without_speculation() -> None:
    outs = []
    for speculative in (None, {"block_size": 2}, {"block_size": 5}, {**NGRAM, "block_size": 3}):
        grammar = ParityGrammar(eos=V - 1, length=6)
        result = ContractExecutor(models(3)).run(
            mix(speculative=speculative), context(max_tokens=10, grammar=grammar, eos=[V - 1])
        )
        outs.append(result.tokens)
        if speculative:
            assert grammar.rollbacks, "the draft was walked through the grammar and rolled back"
    assert outs[0] == outs[1] == outs[2] == outs[3]


def test_grammar_log_weights_reweight_the_choice() -> None:
    m = models()
    plain = ContractExecutor(m).run(mix(), context(max_tokens=1, grammar=ParityGrammar(eos=V - 1)))
    first = plain.tokens[0]
    weights = np.zeros(V)
    weights[first] = -50.0  # ASAp: this token's futures are (almost) never grammatical
    grammar = ParityGrammar(eos=V - 1, weights=weights)
    steered = ContractExecutor(m).run(mix(), context(max_tokens=1, grammar=grammar))
    assert steered.tokens[0] != first and steered.tokens[0] % 2 == 0
    assert grammar.weight_calls == 1


# ---- speculative -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 2, 3, 8])
@pytest.mark.parametrize("draft_role", ["a", "b"])
def test_speculative_greedy_is_identical(block_size: int, draft_role: str) -> None:
    m = models(1)
    plain = ContractExecutor(m).run(mix(), context(max_tokens=13))
    spec = ContractExecutor(m).run(
        mix(speculative={"draft_role": draft_role, "block_size": block_size}), context(max_tokens=13)
    )
    assert spec.tokens == plain.tokens
    assert spec.finish == plain.finish
    gens = spec.ops_of(GenerateOp)
    assert gens and all(op.role == draft_role and op.max_tokens <= block_size for op in gens)
    # the other role's view at a block's first position comes with the draft, in the same batch
    views = spec.ops_of(ViewOp)
    assert views and all(op.role != draft_role for op in views)
    for batch in spec.batches:
        if any(isinstance(op, ViewOp) for op in batch):
            assert [type(op) for op in batch] == [GenerateOp, ViewOp]
            assert batch[0].context[3:] == batch[1].context[3:]  # the same output after 3-token prompts
    # the rest of a block is scored from its second position on
    scores = spec.ops_of(ScoreOp)
    assert all(op.role != draft_role for op in scores)
    if block_size > 1:
        assert scores
        for batch, next_batch in zip(spec.batches, spec.batches[1:]):
            if isinstance(next_batch[0], ScoreOp):
                assert next_batch[0].start == len(batch[0].context) + 1
    else:
        assert not scores


def test_speculative_block_is_kept_up_to_the_first_disagreement() -> None:
    m = models(2)
    plain = ContractExecutor(m).run(mix(), context(max_tokens=12))
    spec = ContractExecutor(m).run(mix(speculative={"block_size": 4}), context(max_tokens=12))
    kept = [e for e in spec.emits if "kept" in e.reason]
    replaced = [e for e in spec.emits if "replaces" in e.reason]
    assert kept and replaced, "the test models must both agree and disagree"
    assert spec.tokens == plain.tokens
    # each block ends at its first replacement: never more blocks than replacements + full blocks
    assert len(spec.ops_of(GenerateOp)) <= len(replaced) + 12 // 4 + 1


def test_speculative_respects_eos_stop_strings_and_max_tokens() -> None:
    m = models()
    free = expected_greedy(m, 12)
    eos = free[5]
    for kw in ({"eos": [eos]}, {"stop_strings": [TOK.decode(free[2:4])]}, {"max_tokens": 7}):
        kw.setdefault("max_tokens", 12)
        plain = ContractExecutor(m).run(mix(), context(**kw))
        spec = ContractExecutor(m).run(mix(speculative={"block_size": 3}), context(**kw))
        assert (spec.tokens, spec.text, spec.finish) == (plain.tokens, plain.text, plain.finish)


class EmptyDraftExecutor(ContractExecutor):
    """An engine whose draft returns nothing (a role that refuses to write)."""

    def execute(self, op: Any) -> Any:
        if isinstance(op, GenerateOp):
            return GeneratedBlock([], [], False)
        return super().execute(op)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_ngram_drafts_are_verified_by_every_role_in_one_chunk(block_size: int) -> None:
    m = models(6)  # a loop of five tokens after a few others
    plain = ContractExecutor(m).run(mix(), context(max_tokens=24))
    spec = ContractExecutor(m).run(mix(speculative={**NGRAM, "block_size": block_size}), context(max_tokens=24))
    assert (spec.tokens, spec.finish) == (plain.tokens, plain.finish)
    assert not spec.ops_of(GenerateOp), "no model writes a draft"
    kept = [e for e in spec.emits if "[drafted by prompt lookup, kept]" in e.reason]
    replaced = [e for e in spec.emits if "replaces prompt lookup's draft" in e.reason]
    assert kept and replaced, "the test models must both repeat themselves and break the repetition"
    scores = [batch for batch in spec.batches if isinstance(batch[0], ScoreOp)]
    assert scores
    for batch in scores:
        assert sorted(op.role for op in batch) == ["a", "b"]
        a, b = batch
        drafted = len(a.context) - a.start
        # from the block's first position (the output so far) to the one after the block
        assert 1 <= drafted <= block_size
        assert a.context[3:] == b.context[3:] and a.start - 3 == b.start - 3
    # a block kept whole decides the position after it too: fewer decisions than tokens need views
    assert len(spec.batches) < len(plain.batches)


def test_ngram_block_whole_adds_the_position_after_it() -> None:
    """Models that repeat one token: each block is kept whole and the position after it comes with it."""
    loop = FakeModel(lambda ctx: np.where(np.arange(V) == 5, 0.0, -5.0), V)
    m = {"a": loop, "b": loop}
    spec = ContractExecutor(m).run(mix(speculative={**NGRAM, "block_size": 4}), context(max_tokens=11))
    assert spec.tokens == [5] * 11
    # two single steps (5 is not in the prompt; then 5 once only ends the history), then a block of 4 + 1,
    # then a block cut to 3 so that its position after it is the 11th token
    assert [type(batch[0]) for batch in spec.batches] == [ViewOp, ViewOp, ScoreOp, ScoreOp]
    assert [len(b[0].context) - b[0].start for b in spec.batches[2:]] == [4, 3]


def test_ngram_draft_respects_eos_stop_strings_and_max_tokens() -> None:
    m = models(6)  # a loop of five tokens after a few others
    free = expected_greedy(m, 16)
    eos = free[9]
    for kw in ({"eos": [eos]}, {"stop_strings": [TOK.decode(free[6:8])]}, {"max_tokens": 11}):
        kw.setdefault("max_tokens", 16)
        plain = ContractExecutor(m).run(mix(), context(**kw))
        spec = ContractExecutor(m).run(mix(speculative={**NGRAM, "block_size": 3}), context(**kw))
        assert (spec.tokens, spec.text, spec.finish) == (plain.tokens, plain.text, plain.finish)


def test_an_empty_draft_falls_back_to_a_single_step() -> None:
    m = models()
    plain = ContractExecutor(m).run(mix(), context(max_tokens=5))
    spec = EmptyDraftExecutor(m).run(mix(speculative={"block_size": 4}), context(max_tokens=5))
    assert spec.tokens == plain.tokens


def _sequence_probs(
    m: dict[str, FakeModel],
    prompts: dict[str, tuple],
    length: int,
    temperature: float,
    vocab: int,
    top_k: int,
) -> dict[tuple, float]:
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, prob: float) -> None:
        if len(prefix) == length:
            out[prefix] = prob
            return
        s = m["a"].logprobs(prompts["a"] + prefix) + m["b"].logprobs(prompts["b"] + prefix)
        p = np.exp(s / temperature)
        if top_k:
            p[np.argsort(-p)[top_k:]] = 0.0
        p = p / p.sum()
        for t in range(vocab):
            if p[t] > 0:
                walk(prefix + (t,), prob * p[t])

    walk((), 1.0)
    return out


@pytest.mark.parametrize(
    "speculative,top_k",
    [
        (None, 0), ({"block_size": 2}, 0), ({"block_size": 3, "draft_role": "b"}, 0), ({"block_size": 2}, 3),
        ({**NGRAM, "block_size": 2}, 0), ({**NGRAM, "block_size": 2}, 3),
    ],
)
def test_sampling_distribution_is_exact(speculative: dict | None, top_k: int) -> None:
    """Three tokens over a 4-token vocabulary, with blocks of 2 (crossing a block boundary) or 3; with a
    top-k filter the target is filtered while the draft is not (still exact)."""
    vocab, length, temperature, n = 4, 3, 0.8, 3000
    m = {"a": random_model(vocab, 31), "b": random_model(vocab, 32)}
    tok = CharTokenizer(vocab, special=())
    decoder = mix(speculative=speculative)
    counts: dict[tuple, int] = {}
    for seed in range(n):
        ctx = make_context(
            {"a": ([1, 2, 3], vocab), "b": ([0, 2, 3], vocab)},
            tok,
            max_tokens=length,
            sampling=SamplingOptions(temperature=temperature, top_k=top_k),
            seed=seed,
            eos=(),
        )
        tokens = tuple(ContractExecutor(m).run(decoder, ctx).tokens)
        counts[tokens] = counts.get(tokens, 0) + 1
    probs = _sequence_probs(m, {"a": (1, 2, 3), "b": (0, 2, 3)}, length, temperature, vocab, top_k)
    keys = sorted(probs)
    assert set(counts) <= set(keys)
    observed = np.array([counts.get(k, 0) for k in keys])
    expected = np.array([probs[k] for k in keys]) * n
    assert observed.sum() == n
    assert chisquare(observed, expected).pvalue > 1e-3
