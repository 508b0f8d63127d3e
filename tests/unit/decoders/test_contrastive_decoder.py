"""Contrastive decoding against its reference (numpy fake models; transformers in test_hf_exactness)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from alignd.decoders.contract import SamplingOptions, ViewOp
from alignd.decoders.contrastive import Contrastive
from tests.reference import contrastive_ref
from tests.reference.common import numpy_model, sequence_distribution
from tests.support.fake_models import CharTokenizer, ContractExecutor, make_context, random_model, table_model

V = 10
TOK = CharTokenizer(V, special=())
EXPERT_PROMPT = [1, 2, 3, 4]
AMATEUR_PROMPT = [5, 6, 4]


def decoder(**params: Any) -> Contrastive:
    return Contrastive(Contrastive.parse_params(params))


def ctx(**kw: Any) -> Any:
    kw.setdefault("eos", (0,))
    return make_context({"expert": (EXPERT_PROMPT, V), "amateur": (AMATEUR_PROMPT, V)}, TOK, **kw)


def test_defaults_and_ranges() -> None:
    p = Contrastive.parse_params({})
    assert (p.alpha, p.beta, p.tau, p.amateur_context, p.formula, p.speculative) == (
        0.1,
        1.0,
        0.5,
        "full",
        "cd",
        None,
    )
    for bad in (
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"tau": 0},
        {"beta": -1},
        {"amateur_context": "none"},
        {"x": 1},
    ):
        with pytest.raises(ValidationError):
            Contrastive.parse_params(bad)
    schema = Contrastive.params_model.model_json_schema()
    assert schema["additionalProperties"] is False
    assert all("description" in prop for prop in schema["properties"].values())
    assert schema["properties"]["alpha"]["maximum"] == 1.0


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"amateur_context": "last_token"},
        {"beta": 0.5, "tau": 1.0, "alpha": 0.0},
        {"formula": "acd", "acd_alpha": 0.5},
        {"speculative": {"block_size": 3}},
        {"amateur_context": "last_token", "speculative": {"block_size": 4, "draft_role": "amateur"}},
    ],
)
def test_greedy_matches_reference(params: dict) -> None:
    expert, amateur = random_model(V, 1), random_model(V, 101)
    result = ContractExecutor({"expert": expert, "amateur": amateur}).run(
        decoder(**params), ctx(max_tokens=12)
    )
    ref_params = {k: v for k, v in params.items() if k != "speculative"}
    expected = contrastive_ref.greedy(
        numpy_model(expert), numpy_model(amateur), EXPERT_PROMPT, AMATEUR_PROMPT, 12, (0,), **ref_params
    )
    assert result.tokens == expected
    assert len(expected) >= 4, "the fake models should not stop at once"


def test_plausibility_applies_in_greedy_mode() -> None:
    """The highest contrastive score is on an implausible token: alpha must exclude it (the reference
    code forgets alpha in greedy search)."""
    expert = table_model({}, [0.6, 0.35, 0.04, 0.01])
    amateur = table_model({}, [0.6, 0.35, 0.001, 0.049])
    vocab = 4
    tok = CharTokenizer(vocab, special=())
    c = make_context({"expert": ([1], vocab), "amateur": ([1], vocab)}, tok, max_tokens=1, eos=())
    result = ContractExecutor({"expert": expert, "amateur": amateur}).run(decoder(), c)
    assert result.tokens == [1]
    assert "expert top-1" in result.emits[0].reason and "demoted" in result.emits[0].reason
    c = make_context({"expert": ([1], vocab), "amateur": ([1], vocab)}, tok, max_tokens=1, eos=())
    unconstrained = ContractExecutor({"expert": expert, "amateur": amateur}).run(decoder(alpha=0.0), c)
    assert unconstrained.tokens == [2]


def test_last_token_context_for_the_amateur() -> None:
    result = ContractExecutor({"expert": random_model(V, 1), "amateur": random_model(V, 2)}).run(
        decoder(amateur_context="last_token"), ctx(max_tokens=3)
    )
    amateur_views = [op.context for op in result.ops_of(ViewOp) if op.role == "amateur"]
    assert amateur_views[0] == (AMATEUR_PROMPT[-1],)
    assert amateur_views[2] == (AMATEUR_PROMPT[-1], *result.tokens[:2])
    expert_views = [op.context for op in result.ops_of(ViewOp) if op.role == "expert"]
    assert expert_views[0] == tuple(EXPERT_PROMPT)


def test_acd_formula_is_a_weighted_prompt_contrast() -> None:
    expert, amateur = random_model(V, 5), random_model(V, 6)
    one = ContractExecutor({"expert": expert, "amateur": amateur}).run(
        decoder(formula="acd", acd_alpha=0.8), ctx(max_tokens=8)
    )
    # 'acd' with weight a is 'cd' with beta / tau = a
    two = ContractExecutor({"expert": expert, "amateur": amateur}).run(
        decoder(formula="cd", beta=0.8, tau=1.0), ctx(max_tokens=8)
    )
    assert one.tokens == two.tokens
    assert one.emits[0].reason.startswith("contrastive(acd)")


@pytest.mark.parametrize("speculative", [None, {"block_size": 2}])
def test_sampling_distribution_matches_reference(speculative: dict | None) -> None:
    vocab, length, temperature, n = 6, 2, 1.0, 3000
    tok = CharTokenizer(vocab, special=())
    expert, amateur = random_model(vocab, 11, scale=1.0), random_model(vocab, 12, scale=1.0)
    params = {"alpha": 0.05, "speculative": speculative}
    d = decoder(**params)
    counts: dict[tuple, int] = {}
    for seed in range(n):
        c = make_context(
            {"expert": ([1, 2], vocab), "amateur": ([3, 2], vocab)},
            tok,
            max_tokens=length,
            sampling=SamplingOptions(temperature=temperature),
            seed=seed,
            eos=(),
        )
        out = tuple(ContractExecutor({"expert": expert, "amateur": amateur}).run(d, c).tokens)
        counts[out] = counts.get(out, 0) + 1
    probs = sequence_distribution(
        lambda gen: contrastive_ref.next_probs(
            numpy_model(expert), numpy_model(amateur), [1, 2], [3, 2], gen, temperature, alpha=0.05
        ),
        length,
        vocab,
    )
    keys = sorted(probs)
    assert set(counts) <= set(keys)
    observed = np.array([counts.get(k, 0) for k in keys])
    expected = np.array([probs[k] for k in keys]) * n
    assert chisquare(observed, expected).pvalue > 1e-3


def test_plausibility_is_relative_to_the_best_allowed_token() -> None:
    """Under a grammar that forbids the expert's favourite, the head is taken among allowed tokens."""

    class NotOne:
        def allowed_mask(self) -> np.ndarray:
            return np.array([True, False, True, True])

        def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> None:
            return None

        def advance(self, token_id: int) -> None:
            assert token_id != 1

        def rollback(self, num_tokens: int) -> None:
            pass

        def is_terminated(self) -> bool:
            return False

        def finish(self) -> None:
            pass

    # allowed: 0 (p .06), 2 (p .04), 3 (p .001): head among allowed = {0, 2} (3 < 0.1 * .06)
    expert = table_model({}, [0.06, 0.899, 0.04, 0.001])
    amateur = table_model({}, [0.5, 0.3, 0.19, 0.01])
    vocab = 4
    tok = CharTokenizer(vocab, special=())
    c = make_context(
        {"expert": ([1], vocab), "amateur": ([1], vocab)}, tok, max_tokens=1, eos=(), grammar=NotOne()
    )
    result = ContractExecutor({"expert": expert, "amateur": amateur}).run(decoder(), c)
    # scores: 0 -> log .06 - 2 log .5 = -1.43; 2 -> log .04 - 2 log .19 = 0.10; 3 excluded (else 6.3)
    assert result.tokens == [2]
