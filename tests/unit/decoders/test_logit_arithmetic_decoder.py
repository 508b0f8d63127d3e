"""Logit arithmetic against its reference (numpy fake models; transformers in test_hf_exactness)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from alignd.decoders.contract import SamplingOptions, ViewOp
from alignd.decoders.logit_arithmetic import LogitArithmetic
from tests.reference import logit_arithmetic_ref
from tests.reference.common import numpy_model, sequence_distribution
from tests.support.fake_models import CharTokenizer, ContractExecutor, make_context, random_model

V = 10
TOK = CharTokenizer(V, special=())
PROMPTS = {"base": [1, 2, 3], "aligned": [7, 1, 2, 3], "reference": [8, 1, 2, 3]}


def decoder(**params: Any) -> LogitArithmetic:
    return LogitArithmetic(LogitArithmetic.parse_params(params))


def models(seed: int = 0) -> dict[str, Any]:
    return {
        "base": random_model(V, 40 + seed),
        "aligned": random_model(V, 50 + seed),
        "reference": random_model(V, 60 + seed),
    }


def ctx(**kw: Any) -> Any:
    kw.setdefault("eos", (0,))
    return make_context({r: (p, V) for r, p in PROMPTS.items()}, TOK, **kw)


def test_lambda_is_named_lambda_and_bounded() -> None:
    assert LogitArithmetic.parse_params({"lambda": 2.5}).lam == 2.5
    assert LogitArithmetic.parse_params({}).lam == 1.0
    schema = LogitArithmetic.params_model.model_json_schema()
    assert "lambda" in schema["properties"] and "description" in schema["properties"]["lambda"]
    for bad in ({"lambda": 11}, {"lambda": "x"}, {"lam2": 1}):
        with pytest.raises(ValidationError):
            LogitArithmetic.parse_params(bad)


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5, -1.0])
@pytest.mark.parametrize("speculative", [None, {"block_size": 4}, {"block_size": 2, "draft_role": "aligned"}])
def test_greedy_matches_reference(lam: float, speculative: dict | None) -> None:
    m = models()
    result = ContractExecutor(m).run(
        decoder(**{"lambda": lam, "speculative": speculative}), ctx(max_tokens=10)
    )
    fns = {r: numpy_model(model) for r, model in m.items()}
    expected = logit_arithmetic_ref.greedy(
        fns["base"], fns["aligned"], fns["reference"], PROMPTS, 10, (0,), lam
    )
    assert result.tokens == expected


def test_lambda_zero_is_the_base_alone() -> None:
    m = models(1)
    result = ContractExecutor(m).run(decoder(**{"lambda": 0.0}), ctx(max_tokens=8, eos=()))
    out: list[int] = []
    for _ in range(8):
        out.append(int(np.argmax(m["base"].logprobs((1, 2, 3, *out)))))
    assert result.tokens == out
    assert all("kept" in e.reason for e in result.emits)


def test_every_role_gives_its_full_view() -> None:
    result = ContractExecutor(models()).run(decoder(), ctx(max_tokens=2))
    views = result.ops_of(ViewOp)
    assert {op.role for op in views} == {"base", "aligned", "reference"}
    assert all(op.want.full for op in views)


@pytest.mark.parametrize("speculative", [None, {"block_size": 2}])
def test_sampling_distribution_matches_reference(speculative: dict | None) -> None:
    vocab, length, temperature, n, lam = 5, 2, 0.9, 3000, 1.5
    tok = CharTokenizer(vocab, special=())
    m = {
        "base": random_model(vocab, 1, scale=1.0),
        "aligned": random_model(vocab, 2),
        "reference": random_model(vocab, 3),
    }
    prompts = {"base": [1, 2], "aligned": [3, 2], "reference": [4, 2]}
    d = decoder(**{"lambda": lam, "speculative": speculative})
    counts: dict[tuple, int] = {}
    for seed in range(n):
        c = make_context(
            {r: (p, vocab) for r, p in prompts.items()},
            tok,
            max_tokens=length,
            sampling=SamplingOptions(temperature=temperature),
            seed=seed,
            eos=(),
        )
        out = tuple(ContractExecutor(m).run(d, c).tokens)
        counts[out] = counts.get(out, 0) + 1
    fns = {r: numpy_model(model) for r, model in m.items()}
    probs = sequence_distribution(
        lambda gen: logit_arithmetic_ref.next_probs(
            fns["base"], fns["aligned"], fns["reference"], prompts, gen, lam, temperature
        ),
        length,
        vocab,
    )
    keys = sorted(probs)
    observed = np.array([counts.get(k, 0) for k in keys])
    assert observed.sum() == n
    assert chisquare(observed, np.array([probs[k] for k in keys]) * n).pvalue > 1e-3
