"""The engine interface alignd owns: what the gateway asks of a hosted model, free of vLLM types.

Two implementations: :mod:`alignd.server.engines.vllm_local` (an in-process vLLM ``AsyncLLM``) and
:mod:`alignd.server.engines.vllm_remote` (a ``vllm serve`` reached over HTTP). Only those modules know vLLM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from alignd.decoders.contract import GeneratedBlock, GenerateOp, ScoreOp, StepView, ViewSpec

__all__ = [
    "ChoiceDelta",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "GenerationUpdate",
    "InvalidEngineRequest",
    "ModelInfo",
    "SamplingSpec",
    "Session",
    "StructuredSpec",
    "TokenLogprob",
    "derive_view",
]


class EngineError(RuntimeError):
    """An engine failed to answer."""


class EngineUnavailable(EngineError):
    """The engine is loading, dead, or unreachable (the API answers 503)."""


class InvalidEngineRequest(EngineError, ValueError):
    """The engine rejected a request as invalid (the API answers 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredSpec:
    """An output constraint for native generation (vLLM structured outputs)."""

    kind: Literal["json", "json_object", "regex", "grammar", "choice"]
    value: Any = None


@dataclass
class SamplingSpec:
    """Native generation parameters, as the OpenAI API exposes them."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured: StructuredSpec | None = None
    skip_special_tokens: bool = True
    stream: bool = True  # False: the caller wants the whole answer, so the engine may send it in one piece


@dataclass
class TokenLogprob:
    """One generated (or prompt) token with its log-probability and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """What one choice gained since the previous update."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationUpdate:
    """One streamed update of a native generation: deltas of the choices that moved."""

    choices: list[ChoiceDelta]
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a hosted model."""

    name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    task: str = "generate"


def derive_view(have_want: ViewSpec, have: StepView, want: ViewSpec) -> StepView | None:
    """``want`` at a position from the view already fetched there for ``have_want``, if it holds it (a session
    asked again where it stands answers from its last view instead of asking its engine)."""
    if want == have_want:
        return have
    if have.token_ids is None:  # the full distribution holds every view
        if want.full:
            return have
        ids = np.asarray(sorted(set(want.token_ids)), dtype=np.int64)
        if want.top_k:
            top = np.argsort(-have.logprobs, kind="stable")[: want.top_k]
            ids = np.union1d(ids, top)
        ids = ids[ids < have.logprobs.shape[0]]
        vals = have.logprobs[ids]
        order = np.argsort(-vals, kind="stable")
        return StepView(logprobs=vals[order], token_ids=ids[order])
    if want.full or (want.top_k and (have_want.token_ids or want.top_k > have_want.top_k)):
        return None
    index = {int(t): i for i, t in enumerate(have.token_ids)}
    if any(int(t) not in index for t in want.token_ids):
        return None
    keep = sorted({index[int(t)] for t in want.token_ids} | set(range(min(want.top_k, len(index)))))
    sel = np.asarray(keep, dtype=np.int64)
    vals, ids = have.logprobs[sel], have.token_ids[sel]
    order = np.argsort(-vals, kind="stable")
    return StepView(logprobs=vals[order], token_ids=ids[order])


class Session(ABC):
    """A request kept open in an engine while the caller appends tokens it chose (KV cache reused)."""

    @abstractmethod
    async def view(self, context: Sequence[int], want: ViewSpec) -> StepView:
        """The view at the position after ``context`` (which should extend what the session holds)."""

    async def generate(self, op: GenerateOp) -> GeneratedBlock | None:
        """``op`` written natively inside this session (its KV cache kept for what follows), or ``None`` when
        the session cannot: the caller then asks :meth:`Engine.generate_block`."""
        return None

    async def score(self, op: ScoreOp) -> list[StepView] | None:
        """``op``'s views by appending its tokens to this session in one step, or ``None`` when the session
        cannot: the caller then asks :meth:`Engine.score`."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release the engine request."""

    def join_step(self, group: str, size: int) -> None:
        """The next view of this session is one of ``size`` views of the same engine that a decoder asks
        for together (``group`` names them): an engine that can should compute them in one step. A hint:
        engines without the notion ignore it."""


class Engine(ABC):
    """A hosted model: native generation, open sessions, block scoring and rewards."""

    info: ModelInfo
    rewinds: int = 0
    """Sessions rewound in place so far (by engines whose sessions can go back without a new request)."""
    starts_alone: bool = False
    """Whether the engine must start while no other engine of the server starts (one after another)."""

    @abstractmethod
    async def start(self) -> None:
        """Load or connect; returns when the model can serve."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop and free everything."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailable` when the engine cannot serve."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether the engine finished starting and has not died."""

    @abstractmethod
    def generate(
        self, request_id: str, prompt_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerationUpdate]:
        """Generate natively; cancelling the iteration aborts the engine request."""

    @abstractmethod
    def open_session(self, request_id: str) -> Session:
        """A new session; the first :meth:`Session.view` sends its whole context."""

    @abstractmethod
    async def generate_block(self, request_id: str, op: GenerateOp) -> GeneratedBlock:
        """Run a decoder's :class:`GenerateOp`."""

    @abstractmethod
    async def score(self, request_id: str, op: ScoreOp) -> list[StepView]:
        """Run a decoder's :class:`ScoreOp` (views over positions of a given context)."""

    @abstractmethod
    async def reward(self, request_id: str, texts: list[str]) -> list[float]:
        """Scalar rewards of whole texts (prompt plus response) from a reward model."""
