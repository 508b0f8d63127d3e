"""Reward sources and their combination (``alignd.decoders.rewards``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from alignd.decoders.rewards import (
    Candidates,
    ImplicitReward,
    ModelReward,
    RewardSource,
    RulesReward,
    combine_rewards,
    log_sigmoid,
    rule_rewards,
)


def test_rules_keywords_regex_and_length() -> None:
    rules = RulesReward(
        include=["thank", "please"],
        avoid=["sorry"],
        regex=[{"pattern": r"\d+", "reward": 0.5}],
        length={"target_tokens": 4, "mode": "at_most"},
    )
    cands = Candidates(
        texts=["Thank you", "sorry 42", "please thank", "x"], num_tokens=[2, 6, 4, 8], ended=[False] * 4
    )
    assert rule_rewards(rules, cands).tolist() == pytest.approx([1.0, -1.0 + 0.5 - 0.5, 2.0, -1.0])
    strict = RulesReward(include=["thank"], case_sensitive=True)
    assert rule_rewards(strict, cands).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_at_least_length_penalises_only_ending_early() -> None:
    rules = RulesReward(length={"target_tokens": 10, "mode": "at_least"})
    cands = Candidates(texts=["a", "a"], num_tokens=[4, 4], ended=[False, True])
    assert rule_rewards(rules, cands).tolist() == pytest.approx([0.0, -0.6])


def test_log_sigmoid_is_stable() -> None:
    assert log_sigmoid(np.array(0.0)) == pytest.approx(math.log(0.5))
    assert log_sigmoid(np.array(-1000.0)) == pytest.approx(-1000.0)
    assert log_sigmoid(np.array(1000.0)) == pytest.approx(0.0)


def test_combination_sum_and_log_sigmoid() -> None:
    sources = [ModelReward(weight=2.0, reference=1.0), RulesReward(weight=0.5, reference=-1.0)]
    values = [np.array([1.0, 3.0]), np.array([0.0, -2.0])]
    assert combine_rewards(values, sources, "sum").tolist() == pytest.approx([2.0, 5.0])
    expected = [
        2.0 * math.log(1 / (1 + math.exp(-(1.0 - 1.0)))) + 0.5 * math.log(1 / (1 + math.exp(-(0.0 + 1.0)))),
        2.0 * math.log(1 / (1 + math.exp(-(3.0 - 1.0)))) + 0.5 * math.log(1 / (1 + math.exp(-(-2.0 + 1.0)))),
    ]
    assert combine_rewards(values, sources, "log_sigmoid").tolist() == pytest.approx(expected)


def test_log_sigmoid_rewards_being_good_on_every_property() -> None:
    """Wang et al.: the transformed sum prefers 'good on both' to 'great on one, bad on the other'."""
    sources = [ModelReward(), ImplicitReward()]
    balanced = [np.array([1.0]), np.array([1.0])]
    lopsided = [np.array([6.0]), np.array([-3.0])]
    assert combine_rewards(lopsided, sources, "sum") > combine_rewards(balanced, sources, "sum")
    assert combine_rewards(balanced, sources, "log_sigmoid") > combine_rewards(
        lopsided, sources, "log_sigmoid"
    )


def test_sources_are_a_discriminated_union() -> None:
    adapter = TypeAdapter(RewardSource)
    assert isinstance(adapter.validate_python({"kind": "implicit", "weight": 2}), ImplicitReward)
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "model", "role": "other"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "rules", "regex": [{"pattern": "[unclosed"}]})
