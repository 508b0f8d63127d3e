"""Exactness on real (tiny, random) transformers models: each decoder through the contract, driven by
``tests.support.hf_runner``, returns the same greedy tokens as its reference in ``tests/reference``, with and
without speculative draft-and-verify."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alignd.decoders.args import ARGS
from alignd.decoders.contrastive import Contrastive
from alignd.decoders.logit_arithmetic import LogitArithmetic
from tests.reference import args_ref, contrastive_ref, logit_arithmetic_ref
from tests.support.fake_models import CharTokenizer, make_context
from tests.support.hf_runner import (
    HFModel,
    HFReward,
    logits_fn,
    raw_logits_fn,
    run_with_hf,
    tiny_causal_lm,
    tiny_reward_model,
)

V = 64
EOS = 0
TOK = CharTokenizer(V, special=(EOS,))
PROMPT = TOK.encode("The cat sat")
OTHER_PROMPT = TOK.encode("A dog ran")
MAX = 12
SPECULATIVE = [None, {"block_size": 4}, {"method": "ngram", "block_size": 4, "prompt_lookup_min": 1}]


@pytest.fixture(scope="module")
def lms() -> dict[str, Any]:
    torch.set_num_threads(1)
    return {name: tiny_causal_lm(seed) for name, seed in (("a", 11), ("b", 12), ("c", 13))}


@pytest.fixture(scope="module")
def reward_model() -> Any:
    return tiny_reward_model(14)


def _ctx(roles: dict[str, list[int]]) -> Any:
    return make_context({r: (p, V) for r, p in roles.items()}, TOK, max_tokens=MAX, eos=(EOS,))


@pytest.mark.parametrize("speculative", SPECULATIVE)
@pytest.mark.parametrize("amateur_context", ["full", "last_token"])
def test_contrastive(lms: dict[str, Any], amateur_context: str, speculative: dict | None) -> None:
    params = {"amateur_context": amateur_context, "speculative": speculative}
    decoder = Contrastive(Contrastive.parse_params(params))
    result = run_with_hf(
        decoder,
        _ctx({"expert": PROMPT, "amateur": OTHER_PROMPT}),
        {"expert": HFModel(lms["a"]), "amateur": HFModel(lms["b"])},
    )
    expected = contrastive_ref.greedy(
        logits_fn(lms["a"]),
        logits_fn(lms["b"]),
        PROMPT,
        OTHER_PROMPT,
        MAX,
        (EOS,),
        amateur_context=amateur_context,
    )
    assert result.tokens == expected
    assert len(expected) >= 4


@pytest.mark.parametrize("speculative", SPECULATIVE)
@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_logit_arithmetic(lms: dict[str, Any], lam: float, speculative: dict | None) -> None:
    prompts = {"base": PROMPT, "aligned": OTHER_PROMPT, "reference": OTHER_PROMPT}
    decoder = LogitArithmetic(LogitArithmetic.parse_params({"lambda": lam, "speculative": speculative}))
    result = run_with_hf(
        decoder,
        _ctx(prompts),
        {"base": HFModel(lms["a"]), "aligned": HFModel(lms["b"]), "reference": HFModel(lms["c"])},
    )
    expected = logit_arithmetic_ref.greedy(
        raw_logits_fn(lms["a"]), raw_logits_fn(lms["b"]), raw_logits_fn(lms["c"]), prompts, MAX, (EOS,), lam
    )
    assert result.tokens == expected
    assert len(expected) >= 4


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_args_with_a_reward_model(lms: dict[str, Any], reward_model: Any, speculative: dict | None) -> None:
    decoder = ARGS(ARGS.parse_params({"k": 5, "w": 1.5, "speculative": speculative}))
    reward = HFReward(reward_model, TOK)
    result = run_with_hf(
        decoder, _ctx({"base": PROMPT, "reward": PROMPT}), {"base": HFModel(lms["a"])}, {"reward": reward}
    )
    expected = args_ref.greedy(
        logits_fn(lms["a"]), PROMPT, args_ref.model_reward(reward.ids_reward, (EOS,)), 5, 1.5, V, MAX, (EOS,)
    )
    assert result.tokens == expected
    assert len(expected) >= 4


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_args_with_an_implicit_reward(lms: dict[str, Any], speculative: dict | None) -> None:
    params = {"k": 6, "w": 1.0, "rewards": [{"kind": "implicit"}], "speculative": speculative}
    decoder = ARGS(ARGS.parse_params(params))
    result = run_with_hf(
        decoder,
        _ctx({"base": PROMPT, "aligned": OTHER_PROMPT, "reference": OTHER_PROMPT}),
        {"base": HFModel(lms["a"]), "aligned": HFModel(lms["b"]), "reference": HFModel(lms["c"])},
    )
    reward = args_ref.implicit_reward(logits_fn(lms["b"]), logits_fn(lms["c"]), OTHER_PROMPT, OTHER_PROMPT)
    expected = args_ref.greedy(logits_fn(lms["a"]), PROMPT, reward, 6, 1.0, V, MAX, (EOS,))
    assert result.tokens == expected
    assert len(expected) >= 4
