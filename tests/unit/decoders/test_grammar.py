"""Grammar constraints (xgrammar backend), GrammarSpec and the ``grammar`` decoder on numpy fake models."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from alignd.decoders.contract import (
    DecoderContext,
    DecoderError,
    Emit,
    RoleContext,
    SamplingOptions,
    ViewOp,
)
from alignd.decoders.grammar import (
    BACKENDS,
    GrammarSpec,
    GrammarVocab,
    MaskConstraint,
    TrieStore,
    build_grammar,
)
from alignd.decoders.grammar.decoder import MAX_TOKEN_IDS_VIEW, GrammarAligned
from alignd.decoders.registry import get_decoder_class
from tests.support.fake_models import ContractExecutor, FakeModel

# ---- small fakes: a token-list tokenizer and context-hashed random models --------------------------------

EOS = 0
CHARS = list('{}[]":, abcdefghijklmnopqrstuvwxyz0123456789.-')
TOKENS = ["<eos>", *CHARS, '"name"', '"age"', "true", "false", "null", "ab", "abc", "12", ': "']


class ListTokenizer:
    """Greedy longest-match tokenizer over a token list (id = index); id 0 is EOS and decodes to ''."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self._by_text = {t: i for i, t in enumerate(self.tokens) if i != EOS}
        self._longest = max(len(t) for t in self.tokens)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + n] in self._by_text:
                    out.append(self._by_text[text[i : i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"cannot encode {text[i]!r}")
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.tokens[t] for t in token_ids if t != EOS)


Model = Callable[[tuple[int, ...]], np.ndarray]


def random_model(vocab_size: int, seed: int, sharpness: float = 2.0) -> Model:
    """Log-probabilities that depend (pseudo-randomly, deterministically) on the whole context."""

    def model(context: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, len(context), *context[-6:]])
        logits = rng.normal(size=vocab_size) * sharpness
        return logits - np.logaddexp.reduce(logits)

    return model


def drive(decoder, ctx: DecoderContext, models: dict[str, Model], log: list | None = None):
    """Run a decoder through the shared numpy executor; returns (emits, finish)."""
    result = ContractExecutor({r: FakeModel(m, V) for r, m in models.items()}).run(decoder, ctx)
    if log is not None:
        log.extend(result.ops)
    return result.emits, result.finish


TOKENIZER = ListTokenizer(TOKENS)
V = len(TOKENS) + 3  # the model's vocabulary is wider than the tokenizer's (padding ids are never allowed)
VOCAB = GrammarVocab.from_tokens(TOKENS, eos_token_ids=[EOS], vocab_size=V)


def make_ctx(
    *,
    max_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    grammar=None,
    stop: tuple[str, ...] = (),
    top_logprobs: int = 0,
    prompt: Sequence[int] = (5, 6),
) -> DecoderContext:
    role = RoleContext(
        name="base",
        model="fake",
        prompt_ids=list(prompt),
        tokenizer=TOKENIZER,
        vocab_size=V,
        eos_token_ids=frozenset({EOS}),
    )
    return DecoderContext(
        roles={"base": role},
        max_tokens=max_tokens,
        sampling=SamplingOptions(temperature=temperature, seed=seed),
        rng=np.random.default_rng(seed),
        stop_strings=stop,
        top_logprobs=top_logprobs,
        grammar=grammar,
        extra={"grammar_vocab": VOCAB},
    )


def text_of(emits: list[Emit]) -> str:
    return "".join(e.text for e in emits)


def ids_of(emits: list[Emit]) -> list[int]:
    return [t for e in emits for t in e.token_ids]


# ---- GrammarSpec -----------------------------------------------------------------------------------


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        GrammarSpec(kind="regex", value="")
    with pytest.raises(ValueError):
        GrammarSpec(kind="json_schema", value="{not json")
    with pytest.raises(ValueError):
        GrammarSpec(kind="choice", value=[])
    with pytest.raises(ValueError):
        GrammarSpec(kind="json_object", value="x")
    a = GrammarSpec(kind="json_schema", value={"type": "object", "b": 1, "a": 2})
    b = GrammarSpec(kind="json_schema", value='{"a": 2, "b": 1, "type": "object"}', mode="asap")
    assert a.cache_key() == b.cache_key()


def test_spec_from_response_format() -> None:
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format({"type": "json_object"}) == GrammarSpec(kind="json_object")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = GrammarSpec.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, mode="asap"
    )
    assert spec is not None and spec.kind == "json_schema" and spec.value == schema and spec.mode == "asap"
    with pytest.raises(DecoderError) as err:
        GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.value.param == "response_format.json_schema.schema"
    with pytest.raises(DecoderError):
        GrammarSpec.from_response_format({"type": "yaml"})


# ---- the constraint ------------------------------------------------------------------------------


def allowed_by_regex(pattern: str, prefix: str, length: int = 3) -> set[int]:
    """Brute force: tokens t such that prefix+t can still be completed to a match with few tokens."""
    alphabet = [t for t in TOKENS[1:] if set(t) <= set("abc")]  # no other token can help this pattern
    live: set[int] = set()
    compiled = re.compile(pattern)

    def completable(text: str, depth: int) -> bool:
        if compiled.fullmatch(text):
            return True
        if depth == 0:
            return False
        return any(completable(text + a, depth - 1) for a in alphabet if len(text + a) <= 8)

    for i, tok in enumerate(TOKENS):
        if i == EOS:
            if compiled.fullmatch(prefix):
                live.add(EOS)
        elif completable(prefix + tok, length):
            live.add(i)
    return live


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc"])
def test_mask_matches_brute_force_regex(prefix: str, backend: str) -> None:
    pattern = "(ab|c)+"
    g = build_grammar(GrammarSpec(kind="regex", value=pattern), VOCAB, backend=backend)
    for t in TOKENIZER.encode(prefix):
        g.advance(t)
    mask = g.allowed_mask()
    assert mask.shape == (V,) and not mask[len(TOKENS) :].any()
    assert set(np.flatnonzero(mask).tolist()) == allowed_by_regex(pattern, prefix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constraint_advance_rollback_terminated(backend: str) -> None:
    g = build_grammar(GrammarSpec(kind="choice", value=["abc", "ab1"]), VOCAB, backend=backend)
    assert isinstance(g, MaskConstraint) and g.log_weights(g.allowed_mask(), np.zeros(V)) is None
    start = g.allowed_mask().copy()
    assert not start[EOS] and not g.is_terminated()
    with pytest.raises(DecoderError) as err:
        g.advance(TOKENIZER.encode("c")[0])
    assert err.value.param == "grammar"
    for t in TOKENIZER.encode("ab"):
        g.advance(t)
    assert not g.is_terminated()
    g.advance(TOKENIZER.encode("c")[0])
    assert g.is_terminated() and np.flatnonzero(g.allowed_mask()).tolist() == [EOS]
    g.rollback(2)  # "ab" is one token
    assert np.array_equal(g.allowed_mask(), start)
    g.advance(TOKENIZER.encode("abc")[0])
    assert g.is_terminated()
    g.advance(EOS)
    assert g.is_terminated() and not g.allowed_mask().any()
    with pytest.raises(ValueError):
        g.rollback(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_grammar_is_decoder_error(backend: str) -> None:
    with pytest.raises(DecoderError) as err:
        build_grammar(GrammarSpec(kind="ebnf", value="root ::= undefined_rule"), VOCAB, backend=backend)
    assert err.value.param == "grammar"
    with pytest.raises(ValueError):
        build_grammar(GrammarSpec(kind="regex", value="a+", mode="asap"), VOCAB)  # no store


def test_compiled_grammars_are_cached() -> None:
    backend = VOCAB.backend("xgrammar")
    spec = GrammarSpec(kind="regex", value="[a-c]{2,5}")
    assert backend.compile(spec) is backend.compile(spec.model_copy(update={"mode": "asap"}))


# ---- the decoder ---------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}

GRAMMARS: list[tuple[dict, Callable[[str], bool]]] = [
    ({"regex": "(ab|c)+1"}, lambda s: re.fullmatch("(ab|c)+1", s) is not None),
    ({"choice": ["true", "false", "abc12"]}, lambda s: s in ("true", "false", "abc12")),
    (
        {"ebnf": 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9] | "null"'},
        lambda s: re.fullmatch(r"\[(\d|null)(,(\d|null))*\]", s) is not None,
    ),
    (
        {"json_schema": SCHEMA},
        lambda s: (
            isinstance(d := json.loads(s), dict)
            and set(d) == {"name", "age"}
            and isinstance(d["name"], str)
            and len(d["name"]) <= 6
            and type(d["age"]) is int
        ),
    ),
]


@pytest.mark.parametrize("params,valid", GRAMMARS, ids=["regex", "choice", "ebnf", "json_schema"])
@pytest.mark.parametrize("mode", ["constrained", "asap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_always_matches_grammar(
    params: dict, valid: Callable[[str], bool], mode: str, backend: str
) -> None:
    decoder = GrammarAligned(GrammarAligned.parse_params({**params, "mode": mode, "backend": backend}))
    for seed in range(6):
        temperature = 0.0 if seed == 0 else 1.0
        ctx = make_ctx(max_tokens=60, temperature=temperature, seed=seed)
        emits, finish = drive(decoder, ctx, {"base": random_model(V, seed, sharpness=1.0)})
        text = text_of(emits)
        assert finish.reason == "stop", text
        assert valid(text), text
        assert all(e.role == "base" and e.reason == f"grammar ({mode})" for e in emits)


def test_greedy_is_argmax_over_allowed_tokens() -> None:
    """Greedy constrained decoding equals a brute-force loop: argmax of the raw log-probs over the mask."""
    model = random_model(V, 7)
    spec = GrammarSpec(kind="regex", value="[a-e]{2,6}(1|2)")
    decoder = GrammarAligned(GrammarAligned.parse_params({"regex": spec.value}))
    emits, finish = drive(decoder, make_ctx(), {"base": model})
    ref = build_grammar(spec, VOCAB)
    context, expected = [5, 6], []
    while True:
        scores = np.where(ref.allowed_mask(), model(tuple(context)), -np.inf)
        t = int(np.argmax(scores))
        ref.advance(t)
        if t == EOS:
            break
        expected.append(t)
        context.append(t)
    assert ids_of(emits) == expected and finish.reason == "stop"
    # logprobs are the constrained distribution's
    lp = [x for e in emits for x in e.logprobs]
    assert len(lp) == len(expected) and all(x <= 0 for x in lp)


def test_views_ask_for_allowed_ids_or_full() -> None:
    log: list = []
    decoder = GrammarAligned(GrammarAligned.parse_params({"json_object": True}))
    drive(decoder, make_ctx(max_tokens=12), {"base": random_model(V, 3)}, log)
    assert all(isinstance(op, ViewOp) for op in log)
    first = log[0].want
    assert first.token_ids and not first.full  # only "{" (and maybe whitespace) may open an object
    assert len(first.token_ids) <= MAX_TOKEN_IDS_VIEW


def test_sampling_distribution_matches_masked_model() -> None:
    """With T=1, the first token's frequencies follow the model renormalised over the allowed tokens."""
    from scipy.stats import chisquare

    model = random_model(V, 11, sharpness=0.5)
    spec = {"regex": "[a-d]1"}
    decoder = GrammarAligned(GrammarAligned.parse_params(spec))
    ids = [TOKENIZER.encode(c)[0] for c in "abcd"]
    lp = model((5, 6))[ids]
    expected = np.exp(lp - np.logaddexp.reduce(lp))
    counts = np.zeros(4)
    n = 600
    for seed in range(n):
        emits, _ = drive(decoder, make_ctx(temperature=1.0, seed=seed), {"base": model})
        counts[ids.index(ids_of(emits)[0])] += 1
    assert chisquare(counts, expected * n).pvalue > 1e-3


def test_stop_strings_and_max_tokens() -> None:
    decoder = GrammarAligned(GrammarAligned.parse_params({"regex": "abababab1"}))
    emits, finish = drive(decoder, make_ctx(stop=("ba",)), {"base": random_model(V, 1)})
    assert text_of(emits) == "a" and finish.reason == "stop"
    emits, finish = drive(decoder, make_ctx(max_tokens=3), {"base": random_model(V, 1)})
    assert len(ids_of(emits)) == 3 and finish.reason == "length"


def test_top_logprobs() -> None:
    decoder = GrammarAligned(GrammarAligned.parse_params({"regex": "[a-z]1"}))
    emits, _ = drive(decoder, make_ctx(top_logprobs=3), {"base": random_model(V, 2)})
    tops = [t for e in emits for t in e.top_logprobs]
    assert len(tops) == 2 and len(tops[0]) == 3 and len(tops[1]) == 1  # only "1" may follow the letter
    first = ids_of(emits)[0]
    assert max(tops[0], key=tops[0].get) == first  # greedy


def test_grammar_sources() -> None:
    decoder = GrammarAligned(GrammarAligned.parse_params({}))
    with pytest.raises(DecoderError) as err:
        drive(decoder, make_ctx(), {"base": random_model(V, 0)})
    assert err.value.param == "alignment.params"
    # a constraint the server built
    ctx = make_ctx(grammar=build_grammar(GrammarSpec(kind="choice", value=["null"]), VOCAB))
    emits, _ = drive(decoder, ctx, {"base": random_model(V, 0)})
    assert text_of(emits) == "null"
    # a spec the server parsed from response_format, compiled with the recipe's mode
    ctx = make_ctx()
    ctx.extra["grammar_spec"] = GrammarSpec(kind="choice", value=["false"])
    emits, _ = drive(decoder, ctx, {"base": random_model(V, 0)})
    assert text_of(emits) == "false"
    # a recipe grammar and a response_format together are a 400
    fixed = GrammarAligned(GrammarAligned.parse_params({"regex": "a"}))
    ctx = make_ctx()
    ctx.extra["grammar_spec"] = GrammarSpec(kind="json_object")
    with pytest.raises(DecoderError) as err:
        drive(fixed, ctx, {"base": random_model(V, 0)})
    assert err.value.param == "response_format"


def test_params_validation_and_registry() -> None:
    assert get_decoder_class("grammar") is GrammarAligned
    with pytest.raises(ValueError):
        GrammarAligned.parse_params({"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError):
        GrammarAligned.parse_params({"json_schema": "{oops"})
    with pytest.raises(ValueError):
        GrammarAligned.parse_params({"mode": "beam"})
    with pytest.raises(ValueError):
        GrammarAligned.parse_params({"unknown": 1})


def test_asap_store_on_instance_and_shared() -> None:
    decoder = GrammarAligned(GrammarAligned.parse_params({"regex": "[ab]{1,3}1", "mode": "asap"}))
    drive(decoder, make_ctx(temperature=1.0), {"base": random_model(V, 0)})
    assert len(decoder.store) == 1
    shared = TrieStore()
    ctx = make_ctx(temperature=1.0)
    ctx.extra["grammar_store"] = shared
    drive(decoder, ctx, {"base": random_model(V, 0)})
    assert len(shared) == 1 and len(decoder.store) == 1
    # another prompt is another trie
    drive(decoder, make_ctx(temperature=1.0, prompt=(7,)), {"base": random_model(V, 0)})
    assert len(decoder.store) == 2
