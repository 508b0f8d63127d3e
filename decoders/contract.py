"""The contract every alignd decoder follows.

A decoder is a pure, sans-IO object. It never calls an engine: it *asks* for what it needs by yielding
engine operations (:class:`ViewOp`, :class:`GenerateOp`, :class:`ScoreOp`, :class:`RewardOp`), receives
their results, and yields :class:`Emit` events carrying the tokens or text it decided, with provenance.
The generation loop in ``alignd.server.generation`` runs the operations of every live request against the
engines (batching them, keeping vLLM streaming sessions open, running roles in parallel) and turns the
emitted events into OpenAI responses. Tests drive the same generator with numpy stand-ins for models.

The protocol of :meth:`Decoder.run`::

    results = yield [op, op, ...]      # engine operations, run concurrently; one result per op, in order
    yield Emit(...)                    # output; the loop answers with None
    return Finish(reason)              # "stop" or "length"

Role contexts are always passed whole (prompt plus everything the role has seen so far), as token ids in
that role's own vocabulary; the loop turns consecutive operations on a growing context into appends to an
open engine session, so passing whole contexts costs nothing.

Log-probabilities in views are the model's raw distribution (before temperature, top-p or penalties).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Decoder",
    "DecoderContext",
    "DecoderError",
    "DecoderParams",
    "DecoderRun",
    "Emit",
    "EngineOp",
    "Finish",
    "GenerateOp",
    "GeneratedBlock",
    "GrammarConstraint",
    "RewardOp",
    "RoleContext",
    "RoleSpec",
    "SamplingOptions",
    "ScoreOp",
    "StepView",
    "Tokenizer",
    "ViewOp",
    "ViewSpec",
]


class DecoderError(ValueError):
    """A recipe or request that a decoder cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RoleSpec:
    """A part a model plays in a decoder, e.g. ``base``, ``aligner``, ``expert``, ``amateur``, ``reward``."""

    name: str
    description: str
    task: Literal["generate", "reward"] = "generate"
    optional: bool = False


# ---- what a decoder can ask of an engine -------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """Which log-probabilities to return at a position.

    ``full`` asks for the whole vocabulary; otherwise the ``top_k`` most likely tokens plus the tokens in
    ``token_ids`` (at most 128), whichever are asked for.
    """

    top_k: int = 0
    token_ids: tuple[int, ...] = ()
    full: bool = False


@dataclass
class StepView:
    """What a decoder sees of one model at one position: log-probabilities of some or all tokens.

    ``token_ids`` is ``None`` when ``logprobs`` covers the whole vocabulary (index = token id); otherwise
    ``logprobs[i]`` belongs to ``token_ids[i]``, ordered most likely first for the top-k part.
    """

    logprobs: np.ndarray
    token_ids: np.ndarray | None = None

    @property
    def is_full(self) -> bool:
        """Whether the view covers the whole vocabulary."""
        return self.token_ids is None

    def dense(self, vocab_size: int) -> np.ndarray:
        """The view as a vocabulary-sized float64 vector, ``-inf`` where a token was not returned."""
        if self.token_ids is None:
            out = np.full(vocab_size, -np.inf)
            n = min(vocab_size, self.logprobs.shape[0])
            out[:n] = self.logprobs[:n]
            return out
        out = np.full(vocab_size, -np.inf)
        out[self.token_ids] = self.logprobs
        return out

    def top(self) -> tuple[int, float]:
        """The most likely token id and its log-probability."""
        i = int(np.argmax(self.logprobs))
        tid = i if self.token_ids is None else int(self.token_ids[i])
        return tid, float(self.logprobs[i])

    def logprob_of(self, token_id: int) -> float:
        """The log-probability of one token, ``-inf`` if the view does not include it."""
        if self.token_ids is None:
            return float(self.logprobs[token_id]) if token_id < self.logprobs.shape[0] else -np.inf
        hits = np.nonzero(self.token_ids == token_id)[0]
        return float(self.logprobs[hits[0]]) if hits.size else -np.inf

    def finite_entries(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A partial view's entries inside the vocabulary with a finite log-probability: int64 token ids and
        float64 log-probabilities, in the view's order."""
        assert self.token_ids is not None, "finite_entries reads a partial view"
        ids = np.asarray(self.token_ids, dtype=np.int64)
        lps = np.asarray(self.logprobs, dtype=np.float64)
        keep = (ids < vocab_size) & np.isfinite(lps)
        return ids[keep], lps[keep]

    def logprobs_of(self, token_ids: np.ndarray) -> np.ndarray:
        """The float64 log-probabilities of ``token_ids``, ``-inf`` for tokens the view does not include."""
        ids = np.asarray(token_ids, dtype=np.int64)
        out = np.full(ids.shape, -np.inf)
        if self.token_ids is None:
            inside = ids < self.logprobs.shape[0]
            out[inside] = self.logprobs[ids[inside]]
            return out
        if self.token_ids.size == 0 or ids.size == 0:
            return out
        order = np.argsort(self.token_ids, kind="stable")
        have = self.token_ids[order]
        pos = np.minimum(np.searchsorted(have, ids), have.size - 1)
        found = have[pos] == ids
        out[found] = self.logprobs[order[pos[found]]]
        return out


@dataclass(frozen=True)
class ViewOp:
    """The view of ``role`` at the position after ``context`` (token ids in the role's vocabulary)."""

    role: str
    context: tuple[int, ...]
    want: ViewSpec


@dataclass(frozen=True)
class SamplingOptions:
    """How an engine samples when a decoder lets it generate natively (``temperature=0`` is greedy)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerateOp:
    """Let ``role`` write up to ``max_tokens`` natively after ``context``.

    Each generated token comes with the view of the position that produced it (``want``). Generation stops
    early at the role's end-of-sequence tokens or any of ``stop_token_ids``.
    """

    role: str
    context: tuple[int, ...]
    max_tokens: int
    want: ViewSpec = ViewSpec(top_k=1)
    sampling: SamplingOptions = SamplingOptions()
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GeneratedBlock:
    """The result of a :class:`GenerateOp`: tokens, the view that produced each, and whether it ended."""

    token_ids: list[int]
    views: list[StepView]
    finished: bool  # True when the role stopped on its own (EOS or a stop token), not on max_tokens


@dataclass(frozen=True)
class ScoreOp:
    """Views of ``role`` at every position from ``start`` to ``len(context)`` inclusive.

    The view at position ``i`` is the distribution that predicts ``context[i]`` (for ``i == len(context)``,
    the next token after the context). ``start`` must be at least 1.
    """

    role: str
    context: tuple[int, ...]
    start: int
    want: ViewSpec


@dataclass(frozen=True)
class RewardOp:
    """Scalar rewards from a reward model for each ``(prompt, response)`` text pair."""

    role: str
    pairs: tuple[tuple[str, str], ...]


EngineOp = ViewOp | GenerateOp | ScoreOp | RewardOp


# ---- what a decoder emits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Emit:
    """Output a decoder decided, with provenance.

    For decoders on a shared vocabulary ``token_ids`` are in that vocabulary and ``text`` may be left
    empty (the loop detokenizes); text-level decoders set ``text`` and may set ``token_ids`` in the
    vocabulary of ``output_role``'s tokenizer. ``logprobs`` are the decoder's own log-probabilities of the
    emitted tokens where it has them (same length as ``token_ids``).
    """

    role: str
    reason: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[dict[int, float], ...] = ()


@dataclass(frozen=True)
class Finish:
    """Why a decoder stopped: ``stop`` (end of sequence or stop string) or ``length`` (max_tokens)."""

    reason: Literal["stop", "length"]


# ---- grammar constraints ---------------------------------------------------------------------------


class GrammarConstraint(Protocol):
    """A grammar that one running choice must match, wrapped around any token-level decoder.

    Built by ``alignd.decoders.grammar`` (xgrammar or llguidance behind it). The token-level driver asks
    it, at every position, which tokens are allowed and (for ASAp) how to reweight them, then tells it the
    token chosen together with the raw distribution the choice was made from.
    """

    def allowed_mask(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next (EOS included when the
        text so far is complete)."""
        ...

    def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> np.ndarray | None:
        """Log of the expected-future-grammaticality weight of each vocabulary token (ASAp), or ``None``
        for plain constrained decoding. ``logprobs`` is the raw (unmasked) distribution at this position."""
        ...

    def advance(self, token_id: int) -> None:
        """Accept the chosen token; raises ``DecoderError`` if the grammar does not allow it."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative blocks that were not kept)."""
        ...

    def is_terminated(self) -> bool:
        """Whether the grammar has accepted its end (no token but EOS may follow)."""
        ...

    def finish(self) -> None:
        """Tell the constraint the choice is over (ASAp folds the finished sample into its trie)."""
        ...


# ---- what a decoder is given -------------------------------------------------------------------------


class Tokenizer(Protocol):
    """The part of a model's tokenizer a decoder may use."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens skipped."""
        ...


@dataclass
class RoleContext:
    """One role of a running request: its model's prompt, tokenizer and vocabulary."""

    name: str
    model: str
    prompt_ids: list[int]
    tokenizer: Tokenizer
    vocab_size: int
    eos_token_ids: frozenset[int]
    prompt_text: str = ""


@dataclass
class DecoderContext:
    """Everything a decoder needs to run one choice of one request."""

    roles: Mapping[str, RoleContext]
    max_tokens: int
    sampling: SamplingOptions
    rng: np.random.Generator
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 0  # how many alternatives the client asked for per token (0: none)
    trace: bool = False
    grammar: GrammarConstraint | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DecoderParams(BaseModel):
    """Base class of every decoder's parameter model: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


DecoderRun = Generator[list[EngineOp] | Emit, Any, Finish]


class Decoder(ABC):
    """A token-level (or text-level) decoding method that several models take part in.

    Subclasses set the class attributes and implement :meth:`run`. An instance holds one recipe's
    validated parameters and may hold state shared across requests (a grammar trie, for example); per-run
    state lives in the generator :meth:`run` returns.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    roles: ClassVar[tuple[RoleSpec, ...]]
    params_model: ClassVar[type[DecoderParams]]
    shared_vocab: ClassVar[bool]
    """Whether all generating roles must share one vocabulary (token-level merging)."""

    def __init__(self, params: DecoderParams) -> None:
        self.params = params

    @classmethod
    def parse_params(cls, raw: Mapping[str, Any] | None) -> DecoderParams:
        """Validate raw parameters; a pydantic ``ValidationError`` names the bad field."""
        return cls.params_model.model_validate(dict(raw or {}))

    def output_role(self) -> str:
        """The role whose tokenizer detokenizes emitted token ids (and counts usage)."""
        return self.roles[0].name

    @abstractmethod
    def run(self, ctx: DecoderContext) -> DecoderRun:
        """Decode one choice: yield engine operations and :class:`Emit` events, return :class:`Finish`."""
