"""Numpy stand-ins for models and an executor that runs decoder contract operations on them.

A model here is anything with ``vocab_size`` and ``logprobs(context) -> np.ndarray`` (the full next-token
log-distribution after a context tuple). :class:`ContractExecutor` plays the generation loop: it runs a
decoder's generator, executes its :class:`ViewOp`, :class:`GenerateOp`, :class:`ScoreOp` and
:class:`RewardOp` against such models (``tests.support.hf_runner`` plugs transformers models into the same
executor), collects the :class:`Emit` events and returns a :class:`RunResult`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from alignd.decoders.contract import (
    Decoder,
    DecoderContext,
    Emit,
    EngineOp,
    Finish,
    GeneratedBlock,
    GenerateOp,
    RewardOp,
    RoleContext,
    SamplingOptions,
    ScoreOp,
    StepView,
    ViewOp,
    ViewSpec,
)
from alignd.decoders.speculative import log_softmax, sample_from, sampling_probs

__all__ = [
    "CharTokenizer",
    "ContractExecutor",
    "FakeModel",
    "LanguageModel",
    "RunResult",
    "make_context",
    "make_view",
    "random_model",
    "table_model",
]


class LanguageModel(Protocol):
    """What the executor needs of a model: its vocabulary size and next-token log-probabilities."""

    vocab_size: int

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        """The full, normalised next-token log-distribution after ``context`` (float64)."""
        ...


class FakeModel:
    """A model given by a function from a context tuple to next-token scores (normalised here)."""

    def __init__(self, fn: Callable[[tuple[int, ...]], np.ndarray], vocab_size: int) -> None:
        self._fn = fn
        self.vocab_size = vocab_size
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self.calls = 0

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        """Log-softmax of the function's scores, cached per context."""
        context = tuple(int(t) for t in context)
        hit = self._cache.get(context)
        if hit is None:
            self.calls += 1
            hit = log_softmax(np.asarray(self._fn(context), dtype=np.float64))
            self._cache[context] = hit
        return hit


def random_model(vocab_size: int, seed: int, order: int = 2, scale: float = 1.5) -> FakeModel:
    """A deterministic random n-gram model: the scores depend on the last ``order`` tokens and ``seed``."""

    def fn(context: tuple[int, ...]) -> np.ndarray:
        key = hashlib.blake2b(repr((seed, context[-order:])).encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(key, "little")).normal(0.0, scale, vocab_size)

    return FakeModel(fn, vocab_size)


def table_model(rows: Mapping[tuple[int, ...], Sequence[float]], default: Sequence[float]) -> FakeModel:
    """A model given by explicit probability rows keyed by context suffix (longest match wins)."""
    vocab = len(default)
    keys = sorted(rows, key=len, reverse=True)

    def fn(context: tuple[int, ...]) -> np.ndarray:
        for k in keys:
            if len(k) <= len(context) and tuple(context[len(context) - len(k) :]) == k:
                return np.log(np.maximum(np.asarray(rows[k], dtype=np.float64), 1e-300))
        return np.log(np.maximum(np.asarray(default, dtype=np.float64), 1e-300))

    return FakeModel(fn, vocab)


class CharTokenizer:
    """One character per token id; ids in ``special`` decode to nothing (like skipped special tokens)."""

    ALPHABET = (
        "\x00abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?-#`\n'\"()[]{}<>/=+*_"
    )

    def __init__(self, vocab_size: int, special: Sequence[int] = (0,), alphabet: str | None = None) -> None:
        alphabet = alphabet or self.ALPHABET
        if len(alphabet) < vocab_size:
            raise ValueError("alphabet too small for the vocabulary")
        self.chars = alphabet[:vocab_size]
        self.special = frozenset(special)
        self._index = {c: i for i, c in enumerate(self.chars) if i not in self.special}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (one per character)."""
        return [self._index[c] for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special ids skipped."""
        return "".join(self.chars[int(t)] for t in token_ids if int(t) not in self.special)


def make_view(logprobs: np.ndarray, want: ViewSpec) -> StepView:
    """The :class:`StepView` an engine would return for ``want`` from a full log-distribution."""
    if want.full:
        return StepView(np.array(logprobs, dtype=np.float64))
    ids: list[int] = []
    if want.top_k > 0:
        ids.extend(int(t) for t in np.argsort(-logprobs, kind="stable")[: want.top_k])
    for t in want.token_ids:
        if int(t) not in ids:
            ids.append(int(t))
    arr = np.array(ids, dtype=np.int64)
    return StepView(np.array(logprobs[arr], dtype=np.float64), arr)


def make_context(
    roles: Mapping[str, tuple[Sequence[int], int]],
    tokenizer: Any,
    *,
    max_tokens: int = 8,
    sampling: SamplingOptions | None = None,
    seed: int = 0,
    eos: Sequence[int] = (0,),
    stop_strings: Sequence[str] = (),
    top_logprobs: int = 0,
    grammar: Any = None,
    models: Mapping[str, str] | None = None,
    trace: bool = True,
) -> DecoderContext:
    """A :class:`DecoderContext` over ``roles`` (name -> (prompt ids, vocab size)) sharing one tokenizer
    (traced by default, so that emits carry their provenance reasons)."""
    role_ctx = {
        name: RoleContext(
            name=name,
            model=(models or {}).get(name, name),
            prompt_ids=list(prompt),
            tokenizer=tokenizer,
            vocab_size=vocab,
            eos_token_ids=frozenset(eos),
            prompt_text=tokenizer.decode(prompt),
        )
        for name, (prompt, vocab) in roles.items()
    }
    return DecoderContext(
        roles=role_ctx,
        max_tokens=max_tokens,
        sampling=sampling or SamplingOptions(),
        rng=np.random.default_rng(seed),
        stop_strings=tuple(stop_strings),
        top_logprobs=top_logprobs,
        trace=trace,
        grammar=grammar,
    )


@dataclass
class RunResult:
    """What one decoder run produced."""

    tokens: list[int]
    text: str
    emits: list[Emit]
    finish: Finish
    ops: list[EngineOp] = field(default_factory=list)
    batches: list[list[EngineOp]] = field(default_factory=list)

    def ops_of(self, kind: type) -> list[Any]:
        """The executed operations of one type."""
        return [op for op in self.ops if isinstance(op, kind)]


class ContractExecutor:
    """Runs decoder generators against in-process models (numpy fakes or transformers wrappers).

    ``models`` maps a role to a :class:`LanguageModel`; ``rewards`` maps a reward role to a function
    ``(prompt_text, response_text) -> float``.
    """

    def __init__(
        self,
        models: Mapping[str, LanguageModel],
        rewards: Mapping[str, Callable[[str, str], float]] | None = None,
    ) -> None:
        self.models = dict(models)
        self.rewards = dict(rewards or {})
        self._ctx: DecoderContext | None = None

    def run(self, decoder: Decoder, ctx: DecoderContext) -> RunResult:
        """Drive ``decoder.run(ctx)`` to its end."""
        self._ctx = ctx
        gen = decoder.run(ctx)
        emits: list[Emit] = []
        ops: list[EngineOp] = []
        batches: list[list[EngineOp]] = []
        send: Any = None
        while True:
            try:
                item = gen.send(send)
            except StopIteration as stop:
                finish = stop.value
                break
            if isinstance(item, Emit):
                emits.append(item)
                send = None
            else:
                batch = list(item)
                assert batch, "a decoder must not yield an empty batch of operations"
                batches.append(batch)
                ops.extend(batch)
                send = [self.execute(op) for op in batch]
        assert isinstance(finish, Finish), f"decoder returned {finish!r}, not a Finish"
        tokens = [t for e in emits for t in e.token_ids]
        return RunResult(tokens, "".join(e.text for e in emits), emits, finish, ops, batches)

    def execute(self, op: EngineOp) -> Any:
        """The result of one operation."""
        if isinstance(op, ViewOp):
            return make_view(self.models[op.role].logprobs(op.context), op.want)
        if isinstance(op, ScoreOp):
            assert 1 <= op.start <= len(op.context)
            model = self.models[op.role]
            return [
                make_view(model.logprobs(op.context[:i]), op.want)
                for i in range(op.start, len(op.context) + 1)
            ]
        if isinstance(op, GenerateOp):
            return self._generate(op)
        if isinstance(op, RewardOp):
            fn = self.rewards[op.role]
            return [float(fn(prompt, response)) for prompt, response in op.pairs]
        raise TypeError(f"unknown operation {op!r}")

    def _generate(self, op: GenerateOp) -> GeneratedBlock:
        model = self.models[op.role]
        assert self._ctx is not None
        stops = set(self._ctx.roles[op.role].eos_token_ids) | set(op.stop_token_ids)
        rng = np.random.default_rng(op.sampling.seed)
        context = tuple(op.context)
        tokens: list[int] = []
        views: list[StepView] = []
        finished = False
        for _ in range(op.max_tokens):
            lp = model.logprobs(context)
            s = op.sampling
            if s.temperature <= 0:
                token = int(np.argmax(lp))
            else:
                token = sample_from(sampling_probs(lp, s.temperature, s.top_p, s.top_k, s.min_p), rng)
            tokens.append(token)
            views.append(make_view(lp, op.want))
            context = context + (token,)
            if token in stops:
                finished = True
                break
        return GeneratedBlock(tokens, views, finished)
