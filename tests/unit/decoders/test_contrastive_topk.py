"""Contrastive decoding from top-k views (large vocabularies): the same choices and log-probabilities as
from full views, fetching the amateur's missing head tokens or full views only where exactness needs them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from alignd.decoders.contract import SamplingOptions, StepView, ViewOp
from alignd.decoders.contrastive import Contrastive, contrastive_scores
from alignd.decoders.token_level import Step
from tests.reference import contrastive_ref
from tests.reference.common import numpy_model
from tests.support.fake_models import CharTokenizer, ContractExecutor, make_context, random_model

V = 40
TOK = CharTokenizer(V, special=())
EXPERT_PROMPT = [1, 2, 3, 4]
AMATEUR_PROMPT = [5, 6, 4]


@pytest.fixture
def topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partial views on this small vocabulary: the top 4 tokens of each role."""
    monkeypatch.setattr(Contrastive, "full_view_vocab", 0)
    monkeypatch.setattr(Contrastive, "view_top_k", 4)


def decoder(**params: Any) -> Contrastive:
    return Contrastive(Contrastive.parse_params(params))


def ctx(**kw: Any) -> Any:
    kw.setdefault("eos", (0,))
    return make_context({"expert": (EXPERT_PROMPT, V), "amateur": (AMATEUR_PROMPT, V)}, TOK, **kw)


def models(scale: float = 1.5) -> dict[str, Any]:
    return {"expert": random_model(V, 21, scale=scale), "amateur": random_model(V, 22, scale=scale)}


@pytest.mark.usefixtures("topk")
@pytest.mark.parametrize(
    "params",
    [{}, {"alpha": 0.02}, {"formula": "acd"}, {"speculative": {"block_size": 3}}, {"alpha": 0.5, "beta": 2.0}],
)
def test_topk_views_give_the_reference_greedy_output(params: dict) -> None:
    m = models()
    result = ContractExecutor(m).run(decoder(**params), ctx(max_tokens=12, top_logprobs=3))
    ref = {k: v for k, v in params.items() if k != "speculative"}
    expected = contrastive_ref.greedy(
        numpy_model(m["expert"]), numpy_model(m["amateur"]), EXPERT_PROMPT, AMATEUR_PROMPT, 12, (0,), **ref
    )
    assert result.tokens == expected
    wants = [op.want for op in result.ops if hasattr(op, "want")]
    assert any(not w.full for w in wants), "the cheap path ran"


@pytest.mark.usefixtures("topk")
def test_missing_head_tokens_are_fetched_and_a_wide_head_falls_back_to_full_views() -> None:
    m = models(scale=1.5)
    result = ContractExecutor(m).run(decoder(alpha=0.02), ctx(max_tokens=12))
    views = result.ops_of(ViewOp)
    assert any(op.role == "amateur" and op.want.token_ids for op in views) or any(op.want.full for op in views)
    flat = models(scale=0.05)  # near-uniform: the head is wider than any top-4
    result = ContractExecutor(flat).run(decoder(), ctx(max_tokens=4))
    assert any(op.role == "expert" and op.want.full for op in result.ops_of(ViewOp))


def test_logprobs_equal_those_from_full_views(monkeypatch: pytest.MonkeyPatch) -> None:
    m = models()
    full = ContractExecutor(m).run(decoder(), ctx(max_tokens=10, top_logprobs=2))
    monkeypatch.setattr(Contrastive, "full_view_vocab", 0)
    monkeypatch.setattr(Contrastive, "view_top_k", 4)
    part = ContractExecutor(m).run(decoder(), ctx(max_tokens=10, top_logprobs=2))
    assert part.tokens == full.tokens
    for a, b in zip(part.emits, full.emits, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs)
        for ta, tb in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert ta == pytest.approx(tb)


@pytest.mark.usefixtures("topk")
def test_sampling_with_topk_views_draws_the_same_tokens_as_full_views(monkeypatch: pytest.MonkeyPatch) -> None:
    m = models()
    sampling = SamplingOptions(temperature=1.0)
    part = [ContractExecutor(m).run(decoder(), ctx(max_tokens=6, sampling=sampling, seed=s)).tokens for s in range(20)]
    monkeypatch.setattr(Contrastive, "full_view_vocab", 10**6)
    full = [ContractExecutor(m).run(decoder(), ctx(max_tokens=6, sampling=sampling, seed=s)).tokens for s in range(20)]
    assert part == full


def _partial(rng: np.random.Generator, k: int) -> StepView:
    logits = rng.normal(scale=2.0, size=V)
    lps = logits - np.log(np.exp(logits).sum())
    ids = np.argsort(-lps, kind="stable")[:k]
    return StepView(lps[ids].astype(np.float32), ids)


@pytest.mark.parametrize("params", [{}, {"alpha": 0.02}, {"formula": "acd"}, {"alpha": 0.5, "beta": 2.0}])
def test_topk_views_are_scored_over_the_head_alone_with_the_vocabulary_sized_values(params: dict) -> None:
    """With partial views the objective is computed over the plausible head's tokens only (no
    vocabulary-sized vectors per token), with exactly the values of the vocabulary-sized computation."""
    d = decoder(**params)
    p = d.params
    coefficient = p.beta / p.tau if p.formula == "cd" else p.acd_alpha
    rng = np.random.default_rng(5)
    for _ in range(20):
        views = {"expert": _partial(rng, 8), "amateur": _partial(rng, 5)}
        step = Step(ctx(), (), None, V)
        scores = d.scores(step, views, [])
        assert scores.token_ids is not None and scores.token_ids.size < V
        dense = contrastive_scores(views["expert"].dense(V), views["amateur"].dense(V), p.alpha, coefficient)
        assert np.array_equal(scores.dense(V), dense)


def test_a_partial_view_looks_up_many_tokens_at_once() -> None:
    view = StepView(np.array([-0.5, -1.0, -2.0], dtype=np.float32), np.array([7, 3, 11]))
    got = view.logprobs_of(np.array([3, 4, 11, 7, 0]))
    np.testing.assert_array_equal(got, [-1.0, -np.inf, -2.0, -0.5, -np.inf])
    full = StepView(np.array([-0.1, -0.2, -3.0]))
    np.testing.assert_array_equal(full.logprobs_of(np.array([2, 0, 5])), [-3.0, -0.1, -np.inf])
