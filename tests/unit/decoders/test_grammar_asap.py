"""ASAp: the trie's arithmetic, its store's bounds, and convergence to the grammar-conditioned distribution."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from alignd.decoders.contract import (
    DecoderContext,
    Emit,
    Finish,
    RoleContext,
    SamplingOptions,
    StepView,
    ViewOp,
)
from alignd.decoders.grammar import (
    AsapConstraint,
    AsapTrie,
    GrammarSpec,
    GrammarVocab,
    TrieStore,
    build_grammar,
    trie_key,
)
from alignd.decoders.grammar.asap import TrieNode
from alignd.decoders.grammar.decoder import GrammarAligned

TOKENS = ["<eos>", "a", "b", "c"]
EOS, A, B, C = 0, 1, 2, 3
V = len(TOKENS)
VOCAB = GrammarVocab.from_tokens(TOKENS, eos_token_ids=[EOS])
Model = Callable[[tuple[int, ...]], np.ndarray]


class CharTokenizer:
    """One character per token; EOS decodes to nothing."""

    def encode(self, text: str) -> list[int]:
        return [TOKENS.index(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(TOKENS[t] for t in token_ids if t != EOS)


def random_model(seed: int, sharpness: float = 1.0) -> Model:
    def model(context: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, len(context), *context])
        logits = rng.normal(size=V) * sharpness
        return logits - np.logaddexp.reduce(logits)

    return model


def fixed_model(probs: Sequence[float]) -> Model:
    lp = np.log(np.asarray(probs, dtype=np.float64))
    return lambda context: lp


# ---- the trie's arithmetic on a hand-checked example -------------------------------------------


def test_efg_update_by_hand() -> None:
    """P = (eos .1, a .4, b .3, c .2) everywhere; grammar "ab|c"."""
    model = fixed_model([0.1, 0.4, 0.3, 0.2])
    store = TrieStore()
    spec = GrammarSpec(kind="regex", value="ab|c", mode="asap")

    def sample(tokens: list[int]) -> AsapConstraint:
        g = build_grammar(spec, VOCAB, store=store, model="m", prompt_ids=[9])
        assert isinstance(g, AsapConstraint)
        for t in tokens:
            g.log_weights(g.allowed_mask(), model(()))
            g.advance(t)
        g.finish()
        return g

    g = sample([C, EOS])
    root = g.trie.root
    assert root.mass == pytest.approx(0.6)  # a and c allowed at the start
    assert root.children[C].theta == pytest.approx(0.1)  # after "c" only EOS (p .1) is grammatical
    assert root.theta == pytest.approx(0.6 - 0.2 * (1 - 0.1))
    fresh = build_grammar(spec, VOCAB, store=store, model="m", prompt_ids=[9])
    w = fresh.log_weights(fresh.allowed_mask(), model(()))
    assert w is not None and w[C] == pytest.approx(math.log(0.1)) and w[A] == 0.0
    sample([A, B, EOS])
    assert root.children[A].theta == pytest.approx(0.3 * 0.1)  # "a" then only b, then only EOS
    assert root.theta == pytest.approx(0.4 * 0.03 + 0.2 * 0.1)  # now exact: the EFG of the prompt
    # the sampler now draws a/c in proportion to P(a)·θ(a) : P(c)·θ(c) = P("ab") : P("c") (exact)
    w = fresh.log_weights(fresh.allowed_mask(), model(()))
    scores = np.log([0.4, 0.2]) + w[[A, C]]
    assert np.exp(scores - np.logaddexp.reduce(scores)) == pytest.approx([0.012 / 0.032, 0.02 / 0.032])


def test_rollback_and_missing_views() -> None:
    store = TrieStore()
    spec = GrammarSpec(kind="regex", value="[ab]{2}c", mode="asap")
    g = build_grammar(spec, VOCAB, store=store, model="m")
    lp = np.log(np.full(V, 0.25))
    g.log_weights(g.allowed_mask(), lp)
    g.advance(A)
    g.advance(B)  # no view given here: p("b" | "a") unknown, the parent learns nothing from it
    g.rollback(1)
    g.log_weights(g.allowed_mask(), lp)
    g.advance(A)
    g.log_weights(g.allowed_mask(), lp)
    g.advance(C)
    g.log_weights(g.allowed_mask(), lp)
    g.advance(EOS)
    g.finish()
    g.finish()  # idempotent
    node_a = g.trie.root.children[A]
    assert node_a.children[B].p is None and node_a.children[B].theta == 1.0
    assert node_a.children[A].theta == pytest.approx(0.25 * 0.25)
    assert node_a.theta == pytest.approx(0.5 - 0.25 * (1 - 0.0625))
    assert g.trie.num_samples == 1


def test_store_lru_and_node_budget() -> None:
    store = TrieStore(max_nodes=10, max_tries=3)
    for k in "abc":
        store.get(k)
    assert len(store) == 3
    store.get("a")  # touch: "b" is now the least recently used
    store.get("d")
    assert store.peek("b") is None and store.peek("a") is not None and len(store) == 3
    big = store.get("e")
    node = big.root
    for t in range(12):
        node = big.child(node, t % V, 0.5)
    store.enforce_budget()
    assert store.peek("e") is big and len(store) == 1  # the newest trie survives even over budget
    assert trie_key("m", "g", [1, 2]) != trie_key("m", "g", [1, 3]) != trie_key("n", "g", [1, 2])


# ---- convergence ------------------------------------------------------------------------------

PATTERN = "[ab]{1,3}c"
MODEL_SEED = 1


def exact_conditional(model: Model) -> dict[tuple[int, ...], float]:
    """Q(w) ∝ P(w EOS) over every token sequence w the grammar accepts (enumerated through the mask)."""
    g = build_grammar(GrammarSpec(kind="regex", value=PATTERN), VOCAB)
    out: dict[tuple[int, ...], float] = {}

    def dfs(prefix: list[int], logp: float) -> None:
        lp = model(tuple(prefix))
        for t in np.flatnonzero(g.allowed_mask()):
            if t == EOS:
                out[tuple(prefix)] = logp + lp[EOS]
            else:
                g.advance(int(t))
                dfs([*prefix, int(t)], logp + lp[t])
                g.rollback(1)

    dfs([], 0.0)
    z = np.logaddexp.reduce(list(out.values()))
    return {k: math.exp(v - z) for k, v in out.items()}


def sample_many(decoder: GrammarAligned, model: Model, n: int, seed0: int) -> list[tuple[int, ...]]:
    tokenizer = CharTokenizer()
    samples = []
    for i in range(n):
        role = RoleContext("base", "m", [A], tokenizer, V, frozenset({EOS}))
        ctx = DecoderContext(
            roles={"base": role},
            max_tokens=10,
            sampling=SamplingOptions(temperature=1.0),
            rng=np.random.default_rng(seed0 + i),
            extra={"grammar_vocab": VOCAB},
        )
        gen = decoder.run(ctx)
        tokens: list[int] = []
        send = None
        while True:
            try:
                item = gen.send(send)
            except StopIteration as stop:
                assert isinstance(stop.value, Finish) and stop.value.reason == "stop"
                break
            if isinstance(item, Emit):
                tokens.extend(item.token_ids)
                send = None
            else:
                (op,) = item
                assert isinstance(op, ViewOp)
                lp = model(op.context[1:])  # the prompt is [A]; the model sees the output only
                ids = np.array(op.want.token_ids) if not op.want.full else None
                send = [StepView(lp[ids], ids) if ids is not None else StepView(lp)]
        samples.append(tuple(tokens))
    return samples


def kl_empirical_to(q: dict[tuple[int, ...], float], samples: list[tuple[int, ...]]) -> float:
    """KL(empirical || Q): 0 for a perfect sampler up to sampling noise (~(outcomes - 1) / 2n)."""
    counts = Counter(samples)
    n = len(samples)
    assert set(counts) <= set(q), "a sample outside the grammar"
    return sum(c / n * math.log(c / n / q[s]) for s, c in counts.items())


def sampler_distribution(model: Model, trie: AsapTrie | None) -> dict[tuple[int, ...], float]:
    """Exactly what the ASAp sampler draws now: Π_t P(t | w)·θ(w t) normalised over the allowed t."""
    g = build_grammar(GrammarSpec(kind="regex", value=PATTERN), VOCAB)
    out: dict[tuple[int, ...], float] = {}

    def dfs(prefix: list[int], node: TrieNode | None, logs: float) -> None:
        mask = g.allowed_mask()
        scores = np.where(mask, model(tuple(prefix)), -np.inf)
        if node is not None:
            scores = scores + np.where(mask, trie.log_weights(node, V), 0.0)  # type: ignore[union-attr]
        scores = scores - np.logaddexp.reduce(scores[mask])
        for t in np.flatnonzero(mask):
            if t == EOS:
                out[tuple(prefix)] = math.exp(logs + scores[EOS])
            else:
                g.advance(int(t))
                child = node.children.get(int(t)) if node is not None else None
                dfs([*prefix, int(t)], child, logs + scores[t])
                g.rollback(1)

    dfs([], trie.root if trie is not None else None, 0.0)
    return out


def kl(q: dict[tuple[int, ...], float], s: dict[tuple[int, ...], float]) -> float:
    """KL(Q || S) over the grammar's sequences."""
    return sum(p * math.log(p / s[w]) for w, p in q.items())


def test_asap_converges_to_the_conditional_distribution_and_masking_does_not() -> None:
    model = random_model(MODEL_SEED)
    q = exact_conditional(model)
    spec = GrammarSpec(kind="regex", value=PATTERN)
    masked = kl(q, sampler_distribution(model, None))

    # ASAp: the divergence of the distribution it samples from, after k samples, falls towards 0
    decoder = GrammarAligned(
        GrammarAligned.parse_params({"regex": PATTERN, "mode": "asap", "pure_sampling": True})
    )
    key = trie_key("m", spec.cache_key(), [A])
    curve, drawn = [], 0
    for k in (1, 4, 16, 64, 256):
        sample_many(decoder, model, k - drawn, seed0=1000 + drawn)
        drawn = k
        trie = decoder.store.peek(key)
        assert trie is not None and trie.num_samples == k
        curve.append(kl(q, sampler_distribution(model, trie)))
    assert curve[0] <= masked + 1e-9  # one sample can only help
    # not monotone sample by sample (a new branch can shift mass the wrong way first), but it falls
    assert curve[3] < 0.5 * masked and curve[4] < 0.02 * masked, (masked, curve)

    # both through the real decoder: empirical divergence of consecutive windows of samples
    window = 400
    noise = len(q) / (2 * window)  # expected KL(empirical || Q) of a perfect sampler
    results = {}
    for mode in ("constrained", "asap"):
        fresh = GrammarAligned(
            GrammarAligned.parse_params({"regex": PATTERN, "mode": mode, "pure_sampling": True})
        )
        early = sample_many(fresh, model, 50, seed0=5000)
        late = sample_many(fresh, model, 2 * window, seed0=6000)[window:]
        results[mode] = (kl_empirical_to(q, early), kl_empirical_to(q, late))
    constrained, asap = results["constrained"], results["asap"]
    # plain masking samples a fixed, distorted distribution: its divergence does not fall
    assert constrained[1] > 0.6 * constrained[0] and constrained[1] > 10 * noise, constrained
    # ASAp ends at the noise floor of a perfect sampler, far below masking
    assert asap[1] < 3 * noise and asap[1] < 0.1 * constrained[1], (asap, constrained)


# ---- composing: the grammar wraps another token-level decoder ---------------------------------------


def test_asap_wraps_a_token_level_decoder_and_converges() -> None:
    """Logit arithmetic with lambda 0 (the base alone) under an ASAp constraint, through the token-level
    driver: the distribution it samples from converges to the base's grammar-conditioned distribution.
    (This needs the driver to take the end-of-sequence step once the grammar is complete, which the
    ASAp constraint asks for by not reporting itself terminated before EOS.)"""
    from alignd.decoders.logit_arithmetic import LogitArithmetic
    from tests.support.fake_models import ContractExecutor, FakeModel, make_context

    model = random_model(MODEL_SEED)
    q = exact_conditional(model)
    masked = kl(q, sampler_distribution(model, None))
    spec = GrammarSpec(kind="regex", value=PATTERN, mode="asap")
    store = TrieStore()
    fake = FakeModel(lambda ctx: model(ctx[1:]), V)
    other = FakeModel(lambda ctx: np.zeros(V), V)
    executor = ContractExecutor({"base": fake, "aligned": other, "reference": other})
    decoder = LogitArithmetic(LogitArithmetic.parse_params({"lambda": 0.0}))
    for seed in range(256):
        ctx = make_context(
            {"base": ([A], V), "aligned": ([A], V), "reference": ([A], V)},
            CharTokenizer(),
            max_tokens=10,
            sampling=SamplingOptions(temperature=1.0),
            seed=seed,
            grammar=build_grammar(spec, VOCAB, store=store, model="m", prompt_ids=[A]),
        )
        result = executor.run(decoder, ctx)
        assert tuple(result.tokens) in q and result.finish.reason == "stop"
    trie = store.peek(trie_key("m", spec.cache_key(), [A]))
    assert trie is not None and trie.num_samples == 256
    assert kl(q, sampler_distribution(model, trie)) < 0.02 * masked


def test_grammar_wraps_speculative_blocks() -> None:
    """A plain constraint through the driver's draft-and-verify path: rollbacks keep it consistent."""
    from alignd.decoders.logit_arithmetic import LogitArithmetic
    from tests.support.fake_models import ContractExecutor, FakeModel, make_context

    models = {
        r: FakeModel(lambda ctx, s=s: random_model(s)(ctx[1:]), V)
        for r, s in (("base", 1), ("aligned", 2), ("reference", 3))
    }
    decoder = LogitArithmetic(
        LogitArithmetic.parse_params({"lambda": 0.7, "speculative": {"draft_role": "base", "block_size": 3}})
    )
    for mode in ("constrained", "asap"):
        store = TrieStore()
        for seed in range(20):
            ctx = make_context(
                {r: ([A], V) for r in models},
                CharTokenizer(),
                max_tokens=10,
                sampling=SamplingOptions(temperature=1.0 if seed else 0.0),
                seed=seed,
                grammar=build_grammar(
                    GrammarSpec(kind="regex", value=PATTERN, mode=mode),
                    VOCAB,
                    store=store,
                    model="m",
                    prompt_ids=[A],
                ),
            )
            result = ContractExecutor(models).run(decoder, ctx)
            assert re.fullmatch(PATTERN, result.text), result.text
