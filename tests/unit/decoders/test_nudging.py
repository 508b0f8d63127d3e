"""Nudging on numpy "text-world" models with different tokenizers, against the reference implementation."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from alignd.decoders.contract import (
    DecoderContext,
    DecoderError,
    GenerateOp,
    RoleContext,
    SamplingOptions,
    ScoreOp,
    ViewOp,
)
from alignd.decoders.nudging import Nudging, is_word_start
from alignd.decoders.registry import get_decoder_class
from tests.reference.nudging_reference import RefRole, nudging_reference
from tests.support.fake_models import ContractExecutor, FakeModel, RunResult

# ---- tokenizers: three ways to cut the same text ---------------------------------------------------

WORDS = ["sure", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "well", "so", "yes"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
EOS, BOS = 0, 1


class ListTokenizer:
    """Greedy longest-match over a token list; ids 0 (EOS) and 1 (BOS) decode to nothing."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens) if i > BOS}
        self.longest = max(len(t) for t in self.tokens)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                if text[i : i + n] in self.index:
                    out.append(self.index[text[i : i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"cannot encode {text[i]!r}")
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.tokens[t] for t in token_ids if t > BOS)


SPECIAL = ["<eos>", "<s>", " ", ":", "?"]
LEADING = ListTokenizer([*SPECIAL, *(" " + w for w in WORDS), *WORDS, *LETTERS])  # GPT-like " cat"
TRAILING = ListTokenizer([*SPECIAL, *(w + " " for w in WORDS), *WORDS, *LETTERS])  # "cat " + "sat"
CHARS = ListTokenizer([*SPECIAL, *LETTERS])  # one character per token
PROMPT = "q: a:"


# ---- a model defined on text: which word follows which, and how sure it is -------------------------


class TextWorld:
    """After word ``w`` the model wants word ``nxt[w]`` (``None``: end) with probability ``conf[w]`` on
    the token that starts writing it; inside a word and for a lone space it is sure (0.95). Each token is
    the longest one spelling the model's plan, so greedy outputs are canonical tokenizations."""

    def __init__(
        self,
        tok: ListTokenizer,
        nxt: dict[str, str | None],
        conf: dict[str, float],
        opening_space: bool = True,
    ) -> None:
        self.tok = tok
        self.nxt = nxt
        self.conf = conf
        self.opening_space = (
            opening_space  # False: the first word comes without a space (after a chat template)
        )
        self.prompt = [BOS, *tok.encode(PROMPT)]

    def plan(self, text: str) -> tuple[str, int, str]:
        """(continuation text, index in it where the next word's letters begin (-1: none), word before)."""
        words = text.split()
        ends_word = bool(text) and not text[-1].isspace()
        partial = words[-1] if ends_word else ""
        prev = (
            words[-2] if ends_word and len(words) > 1 else (words[-1] if words and not ends_word else "<s>")
        )
        plan, start = "", -1
        if partial and partial not in WORDS:
            target = next((w for w in WORDS if w.startswith(partial)), None)
            if target is not None:
                plan, prev = target[len(partial) :], target
            else:
                prev = "<unk>"
        elif partial:
            prev = partial
        # then the chain of next words
        w = prev
        for _ in range(3):
            n = self.nxt.get(w)
            if n is None:
                break
            sep = (
                ""
                if (not plan and text and text[-1].isspace()) or (not text and not self.opening_space)
                else " "
            )
            if start < 0:
                start = len(plan) + len(sep)
            plan += sep + n
            w = n
        return plan, start, prev

    def scores(self, context: tuple[int, ...]) -> np.ndarray:
        text = self.tok.decode(context[len(self.prompt) :])
        plan, start, prev = self.plan(text)
        vocab = len(self.tok.tokens)
        if not plan:
            chosen, conf = EOS, self.conf.get(prev, 0.9)
        else:
            chosen = self.tok.encode(plan)[0]
            covers_word = 0 <= start < len(self.tok.tokens[chosen])
            conf = self.conf.get(prev, 0.9) if covers_word else 0.95
        probs = np.full(vocab, (1.0 - conf) / (vocab - 1))
        probs[chosen] = conf
        return np.log(probs)

    def model(self) -> FakeModel:
        return FakeModel(self.scores, len(self.tok.tokens))

    def ref_role(self) -> RefRole:
        m = self.model()
        return RefRole(
            lambda ids: torch.from_numpy(m.logprobs(tuple(ids)).copy()),
            self.tok,
            self.prompt,
            frozenset({EOS}),
        )


def random_world(tok: ListTokenizer, seed: int, length: int = 10) -> TextWorld:
    """A chain of ``length`` words from a seeded random walk, each with a random confidence."""
    h = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(h, "little"))
    nxt: dict[str, str | None] = {}
    conf: dict[str, float] = {}
    prev = "<s>"
    for i in range(length):
        w = str(rng.choice([x for x in WORDS if x != prev and x not in nxt]))
        nxt[prev], conf[prev] = w, float(rng.choice([0.15, 0.3, 0.6, 0.9]))
        prev = w
    nxt[prev], conf[prev] = None, 0.9
    for w in [*WORDS, "<unk>"]:  # words the other role may write: continue somewhere on the chain
        if w not in nxt:
            nxt[w] = str(rng.choice([x for x in nxt if x != "<s>" and x != w] or ["the"]))
            conf[w] = float(rng.choice([0.15, 0.6]))
    return TextWorld(tok, nxt, conf)


def context(
    base: TextWorld,
    aligner: TextWorld,
    max_tokens: int = 40,
    stop: Sequence[str] = (),
    sampling: SamplingOptions | None = None,
    seed: int = 0,
) -> DecoderContext:
    def role(name: str, w: TextWorld) -> RoleContext:
        return RoleContext(
            name,
            f"{name}-model",
            list(w.prompt),
            w.tok,
            len(w.tok.tokens),
            frozenset({EOS}),
            prompt_text=PROMPT,
        )

    return DecoderContext(
        roles={"base": role("base", base), "aligner": role("aligner", aligner)},
        max_tokens=max_tokens,
        sampling=sampling or SamplingOptions(),
        rng=np.random.default_rng(seed),
        stop_strings=tuple(stop),
    )


def run(params: dict, base: TextWorld, aligner: TextWorld, **kw) -> RunResult:
    decoder = Nudging(Nudging.parse_params(params))
    return ContractExecutor({"base": base.model(), "aligner": aligner.model()}).run(
        decoder, context(base, aligner, **kw)
    )


def merged(result: RunResult) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in result.emits:
        if not e.text:
            continue
        if out and out[-1][0] == e.role:
            out[-1] = (e.role, out[-1][1] + e.text)
        else:
            out.append((e.role, e.text))
    return out


# ---- word starts -------------------------------------------------------------------------------


def test_word_starts() -> None:
    assert is_word_start("t", " ") and is_word_start(" ", "c") and is_word_start("\n", "T")
    assert not is_word_start("a", "b") and not is_word_start(" ", "\n") and not is_word_start("", "a")


# ---- a hand-checked example --------------------------------------------------------------------

ALIGNER_CHAIN = {
    "<s>": "sure",
    "sure": "the",
    "the": "cat",
    "cat": "sat",
    "sat": "on",
    "on": "a",
    "a": "mat",
    "mat": None,
}


def test_hand_checked_round() -> None:
    """The base is unsure how to open and after "on"; the aligner nudges exactly there."""
    base_chain = {
        "<s>": "the",
        "sure": "the",
        "the": "cat",
        "cat": "sat",
        "sat": "on",
        "on": "the",
        "a": "mat",
        "mat": None,
    }
    base = TextWorld(LEADING, base_chain, {"<s>": 0.2, "sure": 0.2, "on": 0.3})
    aligner = TextWorld(TRAILING, ALIGNER_CHAIN, {})
    result = run({"stop_on_repetition": False, "block_tokens": 3}, base, aligner)
    assert merged(result) == [
        ("aligner", " sure"),  # the first word is always the aligner's
        ("base", " the cat sat on"),  # " the": the base's top-1 agrees with the aligner's next word
        ("aligner", " a"),  # after "on" the base's top-1 " the" has p=0.3 < 0.4
        ("base", " mat"),
    ]
    assert result.finish.reason == "stop"
    reasons = [(e.role, e.reason) for e in result.emits if e.text]
    assert reasons[0] == ("aligner", "nudged: the aligner opens the answer")
    assert reasons[1] == ("base", "base: agrees with the aligner (top-1 p=0.20)")
    assert ("aligner", "nudged: base top-1 p=0.30 < 0.4") in reasons
    # emitted token ids are the base's (the output role's) tokens of the text
    assert LEADING.decode(result.tokens) == result.text
    ref, reason = nudging_reference(
        base.ref_role(), aligner.ref_role(), block_tokens=3, max_tokens=40, prompt_last_char=":"
    )
    assert ref == merged(result) and reason == result.finish.reason


@pytest.mark.parametrize("base_tok", [LEADING, TRAILING])
def test_joining_space_after_the_base_prompt(base_tok: ListTokenizer) -> None:
    """The aligner opens without a space (its chat template ended in a newline); the base's prompt ends
    in "a:". The output has no leading space, but the base reads "a: sure", not "a:sure"."""
    aligner = TextWorld(
        base_tok if base_tok is TRAILING else TRAILING, ALIGNER_CHAIN, {}, opening_space=False
    )
    base_chain = {
        "<s>": "the",
        "sure": "the",
        "the": "cat",
        "cat": "sat",
        "sat": "on",
        "on": "a",
        "a": "mat",
        "mat": None,
    }
    base = TextWorld(base_tok, base_chain, {"<s>": 0.2})
    result = run({"block_tokens": 3}, base, aligner)
    assert result.text == "sure the cat sat on a mat"
    (role, first), (second, _) = merged(result)[:2]
    assert role == "aligner" and first.strip() == "sure" and second == "base"
    first_base = next(op for op in result.ops_of(ViewOp) if op.role == "base")
    assert base_tok.decode(first_base.context).rstrip().endswith("a: sure")
    ref, reason = nudging_reference(
        base.ref_role(),
        aligner.ref_role(),
        block_tokens=3,
        max_tokens=40,
        prompt_last_char=":",
        shared=base_tok is TRAILING,
    )
    assert ref == merged(result) and reason == result.finish.reason


def test_engine_calls_are_few() -> None:
    """Greedy: every engine call is one step of a role's session and nothing is scored with prompt
    log-probabilities; a session starts over at most once per hand-over. Without the end lookahead the
    aligner writes nothing past a hand-over; with it (the default) at most its block."""
    for seed in (2, 4):
        result = run({"stop_on_repetition": False}, random_world(LEADING, seed), random_world(CHARS, seed),
                     max_tokens=60)
        assert not result.ops_of(ScoreOp) and not result.ops_of(GenerateOp)
        steps = [op for op in result.ops_of(ViewOp) if op.role == "aligner"]
        written = sum(len(CHARS.encode(e.text)) for e in result.emits if e.role == "aligner")
        assert len({op.context for op in steps}) <= written + 16 * (len(merged(result)) + 1)
    for seed in (2, 4):
        base = random_world(LEADING, seed)
        aligner = random_world(CHARS, seed)
        result = run({"stop_on_repetition": False, "aligner_end_lookahead": False}, base, aligner, max_tokens=60)
        assert not result.ops_of(ScoreOp) and not result.ops_of(GenerateOp)
        assert all(op.want.top_k == 1 and not op.want.full for op in result.ops_of(ViewOp))
        assert all(len(batch) == 1 for batch in result.batches)
        handovers = len(merged(result))
        for role, tok in (("base", LEADING), ("aligner", CHARS)):
            steps = [op for op in result.ops_of(ViewOp) if op.role == role]
            restarts = sum(1 for a, b in itertools.pairwise(steps) if b.context[: len(a.context)] != a.context)
            assert restarts <= handovers, role
            if role == "aligner":
                # each step computes a token the aligner writes, or its one token past a hand-over
                written = sum(len(tok.encode(e.text)) for e in result.emits if e.role == role)
                assert len({op.context for op in steps}) <= written + handovers + 1
        assert {e.role for e in result.emits} == {"base", "aligner"}


def test_roles_step_side_by_side_with_the_end_lookahead() -> None:
    """Greedy, with the end lookahead: the aligner's block grows whatever the base says, so its next token
    is computed in the same batch as a probe of the base, and the base writes its first chunk after a
    take-over in the same batches as the aligner completes its block (the output is the reference's:
    test_matches_reference)."""
    for seed in (2, 4):
        result = run({"stop_on_repetition": False}, random_world(LEADING, seed), random_world(CHARS, seed),
                     max_tokens=60)
        pairs = [b for b in result.batches if len(b) > 1]
        assert all(sorted(op.role for op in b) == ["aligner", "base"] for b in pairs)
        base_turns = sum(1 for role, _ in merged(result) if role == "base")
        assert base_turns and len(pairs) >= base_turns
        # the chunks written early were used: the base's session restarts no more than before, at most once
        # per hand-over
        steps = [op.context for op in result.ops_of(ViewOp) if op.role == "base"]
        restarts = sum(1 for a, b in itertools.pairwise(steps) if b[: len(a)] != a)
        assert restarts <= len(merged(result))


def test_chunk_written_early_is_dropped_when_the_aligner_ends() -> None:
    """The base agrees to take over at " the", but the aligner ends its block after " cat sat": the block
    is the answer, and the base's early chunk stops with the aligner's end and is not output."""
    aligner = TextWorld(LEADING, {"<s>": "sure", "sure": "the", "the": "cat", "cat": "sat", "sat": None}, {})
    base = TextWorld(LEADING, {"<s>": "so", "sure": "the", "the": "cat", "cat": "sat", "sat": "on"}, {})
    result = run({"block_tokens": 6}, base, aligner)
    assert merged(result) == [("aligner", " sure the cat sat")] and result.finish.reason == "stop"
    # the probe at " the", then the chunk from there (its first view is the probe's again), one token each
    # time the aligner writes one; the aligner's end stops it
    base_steps = [LEADING.decode(op.context) for op in result.ops_of(ViewOp) if op.role == "base"]
    assert [s.removeprefix("q: a:") for s in base_steps] == [" sure", " sure", " sure the"]
    ref, reason = nudging_reference(
        base.ref_role(), aligner.ref_role(), block_tokens=6, max_tokens=40, prompt_last_char=":", shared=True
    )
    assert ref == merged(result) and reason == result.finish.reason


# ---- the decoder against the reference ----------------------------------------------------------

PAIRS = {
    "leading/trailing": (LEADING, TRAILING),
    "trailing/chars": (TRAILING, CHARS),
    "chars/leading": (CHARS, LEADING),
    "shared": (LEADING, LEADING),
}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("lookahead", [True, False])
def test_matches_reference(pair: str, gamma: float, lookahead: bool) -> None:
    base_tok, al_tok = PAIRS[pair]
    for seed in range(4):
        base = random_world(base_tok, 10 * seed + 1)
        aligner = random_world(al_tok, 10 * seed + 2)
        params = {
            "gamma": gamma,
            "stop_on_repetition": False,
            "block_tokens": 6 + seed,
            "base_chunk_tokens": 3 + seed,
            "aligner_end_lookahead": lookahead,
        }
        result = run(params, base, aligner, max_tokens=30)
        shared = base_tok is al_tok
        ref, reason = nudging_reference(
            base.ref_role(),
            aligner.ref_role(),
            gamma=gamma,
            block_tokens=6 + seed,
            max_tokens=30,
            shared=shared,
            prompt_last_char=":",
            end_lookahead=lookahead,
        )
        assert merged(result) == ref, (seed, result.emits)
        assert result.finish.reason == reason
        assert len(result.tokens) <= 30
        assert base_tok.decode(result.tokens) == result.text


# ---- stops -------------------------------------------------------------------------------------


def test_max_tokens_counts_base_tokens() -> None:
    base = random_world(CHARS, 5)
    aligner = random_world(LEADING, 6)
    for n in (1, 2, 5, 9):
        result = run({"stop_on_repetition": False}, base, aligner, max_tokens=n)
        assert len(result.tokens) == n and len(result.text) == n  # one character per base token
        assert result.finish.reason == "length"


def test_stop_string_cuts_the_output() -> None:
    base = TextWorld(
        LEADING,
        {
            "<s>": "the",
            "the": "cat",
            "cat": "sat",
            "sat": "on",
            "on": "a",
            "a": "mat",
            "mat": None,
            "sure": "the",
        },
        {"<s>": 0.1},
    )
    aligner = TextWorld(LEADING, ALIGNER_CHAIN, {})
    result = run({}, base, aligner, stop=[" on"])
    assert result.text == " sure the cat sat" and result.finish.reason == "stop"
    result = run({}, base, aligner, stop=["t s"])  # inside a base chunk
    assert result.text == " sure the ca"


def test_aligner_end_and_base_end() -> None:
    aligner = TextWorld(TRAILING, {"<s>": "yes", "yes": None}, {})
    base = TextWorld(
        LEADING, {"<s>": "so", "so": "well", "well": None, "yes": "well"}, {"<s>": 0.1, "yes": 0.1}
    )
    result = run({"block_tokens": 3}, base, aligner)
    assert merged(result) == [("aligner", " yes")] and result.finish.reason == "stop"
    # the base ends confidently: decoding stops although the aligner would go on
    aligner = TextWorld(TRAILING, ALIGNER_CHAIN, {})
    base = TextWorld(LEADING, {"<s>": "sure", "sure": "the", "the": None}, {"the": 0.9})
    result = run({"block_tokens": 3}, base, aligner)
    assert result.text == " sure the" and result.finish.reason == "stop"
    # an unsure end is nudged: the aligner goes on
    base = TextWorld(
        LEADING, {"<s>": "sure", "sure": "the", "the": None, "cat": "sat", "sat": None}, {"the": 0.2}
    )
    result = run({"block_tokens": 3}, base, aligner)
    assert result.text.startswith(" sure the cat") and ("aligner", " cat") in merged(result)


def test_repetition_stops() -> None:
    loop = {"<s>": "the", "the": "cat", "cat": "sat", "sat": "on", "on": "the", "sure": "the"}
    base = TextWorld(LEADING, loop, {"<s>": 0.1})
    aligner = TextWorld(LEADING, ALIGNER_CHAIN, {})
    result = run({"repetition_min_words": 4, "base_chunk_tokens": 4}, base, aligner, max_tokens=200)
    assert result.finish.reason == "stop" and len(result.tokens) < 40
    assert result.text.count("the cat sat on") == 1
    # the aligner proposing the same words round after round also stops
    stuck = TextWorld(LEADING, {"<s>": "yes", "yes": "yes"}, {})
    unsure = TextWorld(LEADING, {"<s>": "no"}, {w: 0.05 for w in [*WORDS, "<s>"]})
    result = run({"max_repeated_nudges": 2, "block_tokens": 2}, unsure, stuck, max_tokens=200)
    assert result.finish.reason == "stop" and len(result.tokens) < 20


def test_pending_aligner_tokens_are_reused() -> None:
    """When the base is unsure everywhere the aligner's block is output to its last word start, and the
    rest of the block is kept: the next round generates only the missing tokens."""
    aligner = TextWorld(LEADING, ALIGNER_CHAIN, {})
    base = TextWorld(CHARS, {"<s>": "dog"}, {w: 0.05 for w in [*WORDS, "<s>"]})
    result = run({"block_tokens": 3}, base, aligner)
    assert merged(result) == [("aligner", " sure the cat sat on a mat")]
    # greedy: the aligner writes one token per step of its session, each step only appends
    steps = [op for op in result.ops_of(ViewOp) if op.role == "aligner"]
    assert [len(op.context) for op in steps] == list(range(len(steps[0].context), len(steps[0].context) + len(steps)))
    assert all(b.context[:-1] == a.context for a, b in itertools.pairwise(steps))
    assert not result.ops_of(GenerateOp)
    # sampling: the block's missing tokens come natively, once per round
    result = run({"block_tokens": 3}, base, aligner, sampling=SamplingOptions(temperature=1e-6, seed=1), seed=1)
    assert merged(result) == [("aligner", " sure the cat sat on a mat")]
    gens = [op for op in result.ops_of(GenerateOp) if op.role == "aligner"]
    assert gens[0].max_tokens == 3 and all(op.max_tokens == 2 for op in gens[1:])
    assert all(op.role == "aligner" for op in result.ops_of(GenerateOp))  # the base never took over


def test_sampling_is_seeded_and_valid() -> None:
    base = random_world(LEADING, 8)
    aligner = random_world(TRAILING, 9)
    s = SamplingOptions(temperature=1.0, seed=5)
    a = run({}, base, aligner, sampling=s, seed=5)
    b = run({}, base, aligner, sampling=s, seed=5)
    assert a.text == b.text and a.emits == b.emits
    gens = a.ops_of(GenerateOp)
    assert all(op.sampling.temperature == 1.0 for op in gens)
    assert len({op.sampling.seed for op in gens}) == len(gens)  # a fresh seed per engine call
    c = run({}, base, aligner, sampling=SamplingOptions(temperature=1.0, seed=6), seed=6)
    assert {e.role for e in c.emits} <= {"base", "aligner"}


def test_registry_params_and_shared_detection() -> None:
    assert get_decoder_class("nudging") is Nudging
    assert Nudging.parse_params({}).gamma == 0.4
    with pytest.raises(ValueError):
        Nudging.parse_params({"gamma": 0})
    with pytest.raises(ValueError):
        Nudging.parse_params({"gamma": 1.5})
    with pytest.raises(ValueError):
        Nudging.parse_params({"block_tokens": 1})
    d = Nudging(Nudging.parse_params({}))
    base = TextWorld(LEADING, {}, {})
    ctx = context(base, TextWorld(CHARS, {}, {}))
    assert not d.shares_tokenizer(ctx.roles["base"], ctx.roles["aligner"])
    ctx = context(base, TextWorld(LEADING, {}, {}))
    assert d.shares_tokenizer(ctx.roles["base"], ctx.roles["aligner"])
    ctx.grammar = object()  # type: ignore[assignment]
    with pytest.raises(DecoderError) as err:
        d.run(ctx)
    assert err.value.param == "response_format"
    forced = Nudging(Nudging.parse_params({"shared_tokenizer": True}))
    ctx = context(base, TextWorld(CHARS, {}, {}))
    with pytest.raises(DecoderError):
        forced.shares_tokenizer(ctx.roles["base"], ctx.roles["aligner"])


class ByteTokenizer:
    """One byte per token id, decoded as UTF-8 with replacement characters (like byte-level BPE)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode(errors="replace")


def test_token_starts_around_unfinished_and_invalid_characters() -> None:
    """A byte that continues a character starts nothing; a token after bytes that stay invalid (U+FFFD in
    the output) starts a character, so a space there is a word start. The decoder and the reference agree."""
    from alignd.decoders.nudging import _Track
    from tests.reference.nudging_reference import token_starts

    tok = ByteTokenizer()
    context = list(b"x:")
    new = list(b"a\xe2\x82\xac \xff b")  # "a€ \ufffd b": the euro sign's three bytes, then an invalid byte
    text, offsets = _Track(tok, list(context), frozenset()).decode_after(context, new)
    assert text == "a€ \ufffd b"
    assert offsets == [0, 1, None, None, 2, 3, 4, 5, 6]
    ref = RefRole(lambda ids: torch.zeros(256), tok, context, frozenset())
    assert token_starts(ref, context, new, text) == offsets[:-1]
