"""ARGS against its reference (numpy fake models and rewards; transformers in test_hf_exactness)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import chisquare

from alignd.decoders.args import ARGS
from alignd.decoders.contract import DecoderError, RewardOp, SamplingOptions, StepView, ViewOp
from alignd.decoders.rewards import log_sigmoid
from alignd.decoders.token_level import Step
from tests.reference import args_ref
from tests.reference.common import numpy_model, sequence_distribution
from tests.support.fake_models import CharTokenizer, ContractExecutor, make_context, random_model

V = 12
EOS = 0
TOK = CharTokenizer(V, special=(EOS,))  # id 0 is the end of sequence and decodes to nothing
PROMPT = [1, 2, 3]


def ids_reward(ids: list[int]) -> float:
    """A deterministic fake reward model over token ids (depends on the last three tokens)."""
    key = hashlib.blake2b(repr(tuple(ids[-3:])).encode(), digest_size=8).digest()
    return float(np.random.default_rng(int.from_bytes(key, "little")).normal(0.0, 1.0))


def text_reward(prompt: str, response: str) -> float:
    return ids_reward(TOK.encode(prompt + response))


def decoder(**params: Any) -> ARGS:
    return ARGS(ARGS.parse_params(params))


def models() -> dict[str, Any]:
    return {"base": random_model(V, 72), "aligned": random_model(V, 70), "reference": random_model(V, 71)}


def ctx(roles: tuple[str, ...] = ("base", "reward"), **kw: Any) -> Any:
    kw.setdefault("eos", (EOS,))
    return make_context({r: (PROMPT, V) for r in roles}, TOK, **kw)


def run(d: ARGS, c: Any, m: dict[str, Any] | None = None) -> Any:
    return ContractExecutor(m or models(), {"reward": text_reward}).run(d, c)


def test_params() -> None:
    p = ARGS.parse_params({})
    assert (p.k, p.w, p.temperature, p.combine) == (10, 1.0, 0.7, "sum")
    assert p.rewards[0].kind == "model"
    for bad in (
        {"k": 0},
        {"k": 129},
        {"w": -1},
        {"temperature": 0},
        {"rewards": []},
        {"rewards": [{"kind": "nope"}]},
        {"rewards": [{"kind": "rules", "regex": [{"pattern": "("}]}]},
    ):
        with pytest.raises(ValidationError):
            ARGS.parse_params(bad)
    schema = ARGS.params_model.model_json_schema()
    assert all("description" in prop for prop in schema["properties"].values())


def test_all_candidates_of_a_step_go_in_one_reward_op() -> None:
    result = run(decoder(k=5), ctx(max_tokens=4))
    reward_ops = result.ops_of(RewardOp)
    assert len(reward_ops) == len(result.tokens) + (result.finish.reason == "stop")
    first = reward_ops[0]
    assert len(first.pairs) == 5
    assert {prompt for prompt, _ in first.pairs} == {TOK.decode(PROMPT)}
    top5 = np.argsort(-models()["base"].logprobs(tuple(PROMPT)), kind="stable")[:5]
    assert [resp for _, resp in first.pairs] == [TOK.decode([int(c)]) for c in top5]
    for batch in result.batches:
        assert sum(isinstance(op, RewardOp) for op in batch) <= 1


@pytest.mark.parametrize("speculative", [None, {"block_size": 3}])
@pytest.mark.parametrize("k,w", [(5, 1.0), (10, 1.5), (3, 0.5)])
def test_greedy_with_a_reward_model_matches_reference(k: int, w: float, speculative: dict | None) -> None:
    m = models()
    result = run(decoder(k=k, w=w, speculative=speculative), ctx(max_tokens=10), m)
    expected = args_ref.greedy(
        numpy_model(m["base"]), PROMPT, args_ref.model_reward(ids_reward, (EOS,)), k, w, V, 10, (EOS,)
    )
    assert result.tokens == expected
    assert len(expected) >= 3


@pytest.mark.parametrize("speculative", [None, {"block_size": 4}])
def test_greedy_with_implicit_reward_matches_reference(speculative: dict | None) -> None:
    m = models()
    d = decoder(k=6, w=1.2, rewards=[{"kind": "implicit"}], speculative=speculative)
    result = run(d, ctx(("base", "aligned", "reference"), max_tokens=10), m)
    reward = args_ref.implicit_reward(numpy_model(m["aligned"]), numpy_model(m["reference"]), PROMPT, PROMPT)
    expected = args_ref.greedy(numpy_model(m["base"]), PROMPT, reward, 6, 1.2, V, 10, (EOS,))
    assert result.tokens == expected
    implicit_views = [op for op in result.ops_of(ViewOp) if op.role in ("aligned", "reference")]
    assert implicit_views and all(len(op.want.token_ids) == 6 and not op.want.full for op in implicit_views)


def test_rules_and_log_sigmoid_combination_match_reference() -> None:
    m = models()
    sources = [
        {"kind": "model", "weight": 0.5, "reference": 0.3},
        {
            "kind": "rules",
            "include": ["c"],
            "avoid": ["d"],
            "regex": [{"pattern": "e$", "reward": 2.0}],
            "weight": 2.0,
        },
    ]
    d = decoder(k=8, w=1.0, rewards=sources, combine="log_sigmoid")
    result = run(d, ctx(max_tokens=10), m)

    def rules(text: str) -> float:
        return ("c" in text) - ("d" in text) + 2.0 * text.endswith("e")

    def reward(prompt: list[int], gen: list[int], c: int) -> float:
        text = TOK.decode(gen + ([] if c == EOS else [c]))
        r_model = ids_reward(prompt + gen + ([] if c == EOS else [c]))
        return float(0.5 * log_sigmoid(np.array(r_model - 0.3)) + 2.0 * log_sigmoid(np.array(rules(text))))

    expected = args_ref.greedy(numpy_model(m["base"]), PROMPT, reward, 8, 1.0, V, 10, (EOS,))
    assert result.tokens == expected


def test_zero_weight_is_the_base_greedy() -> None:
    m = models()
    result = run(decoder(w=0.0), ctx(max_tokens=6, eos=()), m)
    out: list[int] = []
    for _ in range(6):
        out.append(int(np.argmax(m["base"].logprobs((*PROMPT, *out)))))
    assert result.tokens == out
    assert all("top-1" in e.reason for e in result.emits)


def test_stops_at_end_of_sequence() -> None:
    m = models()
    free = run(decoder(k=4), ctx(max_tokens=10, eos=()), m).tokens
    eos = free[2]
    c = make_context({"base": (PROMPT, V), "reward": (PROMPT, V)}, TOK, max_tokens=10, eos=(eos,))
    result = run(decoder(k=4), c, m)
    expected = args_ref.greedy(
        numpy_model(m["base"]), PROMPT, args_ref.model_reward(ids_reward, (eos,)), 4, 1.0, V, 10, (eos,)
    )
    assert result.tokens == expected
    assert result.finish.reason == "stop" and len(expected) < 10


def test_temperature_comes_from_params_unless_null_and_request_zero_is_greedy() -> None:
    d = decoder()
    assert d.temperature(ctx(sampling=SamplingOptions(temperature=0.0))) == 0.0
    assert d.temperature(ctx(sampling=SamplingOptions(temperature=1.3))) == 0.7
    assert decoder(temperature=None).temperature(ctx(sampling=SamplingOptions(temperature=1.3))) == 1.3


def test_a_reward_source_without_its_role_is_an_error() -> None:
    with pytest.raises(DecoderError) as info:
        run(decoder(), ctx(("base",)))
    assert info.value.param == "alignment.roles.reward"
    with pytest.raises(DecoderError) as info:
        run(decoder(rewards=[{"kind": "implicit"}]), ctx(("base", "aligned")))
    assert info.value.param == "alignment.roles.reference"
    # rules need no extra role
    assert run(decoder(rewards=[{"kind": "rules", "include": ["a"]}]), ctx(("base",), max_tokens=2)).tokens


def test_speculative_blocks_batch_the_rewards_of_all_positions() -> None:
    result = run(decoder(k=4, speculative={"block_size": 4}), ctx(max_tokens=8))
    batched = [b for b in result.batches if sum(isinstance(op, RewardOp) for op in b) > 1]
    assert batched, "one batch carries the reward ops of several drafted positions"


def test_grammar_restricts_candidates_to_allowed_tokens() -> None:
    class EvenOnly:
        def __init__(self) -> None:
            self.n = 0

        def allowed_mask(self) -> np.ndarray:
            return np.array([t % 2 == 0 and t != EOS for t in range(V)])

        def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> None:
            return None

        def advance(self, token_id: int) -> None:
            assert token_id % 2 == 0
            self.n += 1

        def rollback(self, num_tokens: int) -> None:
            self.n -= num_tokens

        def is_terminated(self) -> bool:
            return False

        def finish(self) -> None:
            pass

    result = run(decoder(k=3), ctx(max_tokens=5, grammar=EvenOnly()))
    assert len(result.tokens) == 5 and all(t % 2 == 0 for t in result.tokens)
    assert all(len(op.pairs) == 3 for op in result.ops_of(RewardOp))
    assert all(op.want.full for op in result.ops_of(ViewOp) if op.role == "base")


@pytest.mark.parametrize("speculative", [None, {"block_size": 2}])
def test_sampling_distribution_matches_reference(speculative: dict | None) -> None:
    vocab, length, n, k, w = 6, 2, 3000, 4, 1.0
    tok = CharTokenizer(vocab, special=())
    base = random_model(vocab, 90, scale=1.0)

    def reward_text(prompt: str, response: str) -> float:
        return ids_reward(tok.encode(prompt + response)) * 0.5

    d = decoder(k=k, w=w, speculative=speculative)  # ARGS' own temperature 0.7
    counts: dict[tuple, int] = {}
    for seed in range(n):
        c = make_context(
            {"base": ([1, 2], vocab), "reward": ([1, 2], vocab)},
            tok,
            max_tokens=length,
            sampling=SamplingOptions(temperature=1.0),
            seed=seed,
            eos=(),
        )
        out = tuple(ContractExecutor({"base": base}, {"reward": reward_text}).run(d, c).tokens)
        counts[out] = counts.get(out, 0) + 1
    reward = args_ref.model_reward(lambda ids: ids_reward(ids) * 0.5, ())
    probs = sequence_distribution(
        lambda gen: args_ref.next_probs(numpy_model(base), [1, 2], gen, reward, k, w, vocab, 0.7),
        length,
        vocab,
    )
    keys = sorted(probs)
    assert set(counts) <= set(keys)
    observed = np.array([counts.get(key, 0) for key in keys])
    assert chisquare(observed, np.array([probs[key] for key in keys]) * n).pvalue > 1e-3


def test_grammar_with_speculation_gives_the_same_output() -> None:
    class Alternating:
        """Parities alternate; the draft is walked through and rolled back."""

        def __init__(self) -> None:
            self.accepted: list[int] = []

        def allowed_mask(self) -> np.ndarray:
            parity = len(self.accepted) % 2
            return np.array([t % 2 == parity and t != EOS for t in range(V)])

        def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> None:
            return None

        def advance(self, token_id: int) -> None:
            assert self.allowed_mask()[token_id]
            self.accepted.append(token_id)

        def rollback(self, num_tokens: int) -> None:
            del self.accepted[len(self.accepted) - num_tokens :]

        def is_terminated(self) -> bool:
            return False

        def finish(self) -> None:
            pass

    outs = [
        run(decoder(k=3, speculative=spec), ctx(max_tokens=8, grammar=Alternating())).tokens
        for spec in (None, {"block_size": 3})
    ]
    assert outs[0] == outs[1] and len(outs[0]) == 8
    assert [t % 2 for t in outs[0]] == [0, 1] * 4


@pytest.mark.parametrize("k", [1, 3, 6])
def test_candidates_from_a_top_k_view_are_those_of_its_vocabulary_sized_vector(k: int) -> None:
    """The base's top-k view is sorted as it is (most likely first, ties to the lowest id, without tokens it
    lacks) instead of a vocabulary-sized vector per step, with the same result."""
    d = decoder(k=k)
    lps = np.array([-1.5, -0.5, -1.5, -np.inf, -0.5, -3.0], dtype=np.float32)
    ids = np.array([9, 7, 2, 5, 4, 11])
    step = Step(ctx(), (), None, V)
    got_ids, got_lps = d._candidates(step, {"base": StepView(lps, ids)})
    full = StepView(StepView(lps, ids).dense(V))
    want_ids, want_lps = d._candidates(step, {"base": full})
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_lps, want_lps)
    assert list(got_ids) == [4, 7, 2, 9, 11][:k]
