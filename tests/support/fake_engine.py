"""A fake :class:`Engine` on a numpy model, for in-process tests of the server (no vLLM).

:class:`FakeEngine` implements the whole engine interface of ``alignd.server.engines.base``: native
generation with ``n``, sampling, ``logprobs``, ``prompt_logprobs``, stop strings, stop token ids, EOS and
``max_tokens`` (DELTA-style updates, one token per choice per update, as vLLM streams them), streaming
sessions, :class:`GenerateOp` blocks, :class:`ScoreOp` views and rewards. Its next-token distribution is a
deterministic function of a hash of the context (``tests.support.fake_models.random_model``), so greedy
outputs repeat across runs.

Knobs that let tests observe the server's edges:

* ``start_delay`` (seconds) or ``hold_start=True`` (start waits for :meth:`FakeEngine.finish_start`):
  the server reports "loading" meanwhile;
* ``fail_on_start``: :meth:`start` raises, as a model that cannot load;
* :meth:`FakeEngine.die`: the engine dies; ``ready`` turns false, health checks and running or new
  requests raise :class:`EngineUnavailable`;
* ``token_delay`` (seconds per generated token or view), to hold requests open.

What happened is recorded: ``requests`` (every request id, in order), ``steps`` (tokens generated and
views computed), ``active`` (running native generations), ``cancelled`` (request ids whose generation was aborted by its consumer) with the event
``cancelled_event``, and ``open_sessions`` / ``sessions_opened``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignd.decoders.contract import GeneratedBlock, GenerateOp, SamplingOptions, ScoreOp, StepView, ViewSpec
from alignd.decoders.speculative import sample_from, sampling_probs
from alignd.server.engines.base import (
    ChoiceDelta,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationUpdate,
    InvalidEngineRequest,
    ModelInfo,
    SamplingSpec,
    Session,
    TokenLogprob,
)
from tests.support.fake_models import FakeModel, make_view, random_model

__all__ = ["FakeEngine", "FakeSession", "load_tokenizer"]


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer at ``path`` (cached: tests build many engines on the same models)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass
class _Choice:
    """One running choice of a native generation."""

    index: int
    rng: np.random.Generator
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class FakeSession(Session):
    """A fake streaming session: views straight from the numpy model, with the engine's token delay."""

    def __init__(self, engine: FakeEngine, request_id: str) -> None:
        self._engine = engine
        self.request_id = request_id
        self.contexts: list[tuple[int, ...]] = []
        self.groups: list[tuple[str, int]] = []  # join_step hints, in order
        self.closed = False
        engine.open_sessions += 1
        engine.sessions_opened += 1

    async def view(self, context: Sequence[int], want: ViewSpec) -> StepView:
        """The view after ``context`` (the fake keeps no cache: every context is computed afresh)."""
        if self.closed:
            raise EngineError(f"session {self.request_id} is closed")
        await self._engine._tick()
        ctx = tuple(int(t) for t in context)
        self.contexts.append(ctx)
        return make_view(self._engine.logprobs(ctx), want)

    def join_step(self, group: str, size: int) -> None:
        """Record the hint (the fake computes every view on its own)."""
        self.groups.append((group, size))

    async def close(self) -> None:
        """Release the session (idempotent)."""
        if not self.closed:
            self.closed = True
            self._engine.open_sessions -= 1


class FakeEngine(Engine):
    """An engine whose model is a deterministic numpy function of the context.

    Parameters
    ----------
    name:
        The hosted model's name (``ModelInfo.name``).
    tokenizer:
        Anything with ``decode(ids, skip_special_tokens=...)`` for the text of native generations; ``None``
        writes each token as ``<id>``. :meth:`from_path` loads a model folder's tokenizer.
    vocab_size, eos_token_ids, max_model_len, task:
        What :attr:`info` reports. ``eos_token_ids`` end native generations and blocks.
    seed, order, scale:
        The numpy model: scores depend on ``seed`` and the last ``order`` context tokens, drawn with
        standard deviation ``scale`` (larger: sharper distributions).
    start_delay, hold_start, fail_on_start, token_delay:
        The knobs described in the module docstring.
    """

    def __init__(
        self,
        name: str,
        tokenizer: Any = None,
        *,
        vocab_size: int = 512,
        eos_token_ids: Sequence[int] = (0,),
        max_model_len: int = 1024,
        task: str = "generate",
        seed: int = 0,
        order: int = 2,
        scale: float = 3.0,
        start_delay: float = 0.0,
        hold_start: bool = False,
        fail_on_start: bool | str = False,
        token_delay: float = 0.0,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.info = ModelInfo(
            name=name,
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            eos_token_ids=frozenset(int(t) for t in eos_token_ids),
            task=task,
        )
        self.model: FakeModel = random_model(vocab_size, seed, order=order, scale=scale)
        self.seed = seed
        self.start_delay = start_delay
        self.fail_on_start = fail_on_start
        self.token_delay = token_delay
        self._hold_start = hold_start
        self._start_gate: asyncio.Event | None = None
        self._started = False
        self._dead = False
        self.shut_down = False
        self.start_calls = 0
        self.requests: list[str] = []
        self.active: set[str] = set()
        self.cancelled: list[str] = []
        self.cancelled_event = asyncio.Event()
        self.open_sessions = 0
        self.sessions_opened = 0
        self.rewards: list[str] = []
        self.steps = 0

    @classmethod
    def from_path(cls, name: str, path: str | Path, **knobs: Any) -> FakeEngine:
        """A fake engine for the model folder ``path``: its tokenizer's vocabulary size, EOS and text."""
        tok = load_tokenizer(str(path))
        knobs.setdefault("vocab_size", len(tok))
        if tok.eos_token_id is not None:
            knobs.setdefault("eos_token_ids", (tok.eos_token_id,))
        return cls(name, tok, **knobs)

    # ---- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Become ready after ``start_delay`` (and :meth:`finish_start` with ``hold_start``)."""
        self.start_calls += 1
        if self._hold_start:
            self._start_gate = self._start_gate or asyncio.Event()
            await self._start_gate.wait()
        if self.start_delay:
            await asyncio.sleep(self.start_delay)
        if self.fail_on_start:
            reason = self.fail_on_start if isinstance(self.fail_on_start, str) else "cannot load weights"
            raise EngineError(f"fake engine {self.name!r}: {reason}")
        self._started = True

    def finish_start(self) -> None:
        """Let a ``hold_start`` engine finish starting."""
        self._hold_start = False
        if self._start_gate is not None:
            self._start_gate.set()

    async def shutdown(self) -> None:
        """Stop: not ready any more."""
        self.shut_down = True
        self._started = False

    def die(self) -> None:
        """Simulate a dead engine (as vLLM's ``EngineDeadError``): everything fails from now on."""
        self._dead = True

    @property
    def ready(self) -> bool:
        """Started, not dead, not shut down."""
        return self._started and not self._dead and not self.shut_down

    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailable` unless ready."""
        if self._dead:
            raise EngineUnavailable(f"model {self.name!r} is unhealthy: engine died")
        if not self.ready:
            raise EngineUnavailable(f"model {self.name!r} is not ready")

    def _check(self) -> None:
        if self._dead:
            raise EngineUnavailable(f"engine died: fake engine {self.name!r}")
        if not self.ready:
            raise EngineUnavailable(f"model {self.name!r} is not ready")

    async def _tick(self) -> None:
        self._check()
        self.steps += 1
        # Always yield to the loop, as a real engine round trip does, so cancellation can land here.
        await asyncio.sleep(self.token_delay)
        self._check()

    # ---- the model -----------------------------------------------------------------------------------

    def logprobs(self, context: Sequence[int]) -> np.ndarray:
        """The full next-token log-distribution after ``context``."""
        return self.model.logprobs(tuple(int(t) for t in context))

    def _text(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return "".join(f"<{t}>" for t in token_ids)
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    @staticmethod
    def _pick(
        logprobs: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator, bias: dict[int, float]
    ) -> int:
        scores = logprobs
        if bias:
            scores = logprobs.copy()
            for tid, b in bias.items():
                scores[tid] += b
        if sampling.temperature <= 0:
            return int(np.argmax(scores))
        probs = sampling_probs(scores, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
        return sample_from(probs, rng)

    @staticmethod
    def _token_logprob(logprobs: np.ndarray, token_id: int, k: int) -> TokenLogprob:
        top = [(int(i), float(logprobs[i])) for i in np.argsort(-logprobs, kind="stable")[:k]] if k else []
        return TokenLogprob(token_id, float(logprobs[token_id]), top)

    # ---- native generation ---------------------------------------------------------------------------

    def _validate(self, prompt_ids: list[int], spec: SamplingSpec) -> None:
        if self.info.task != "generate":
            raise InvalidEngineRequest(f"model {self.name!r} is a {self.info.task} model", "model")
        if spec.structured is not None:
            raise InvalidEngineRequest("the fake engine has no structured outputs", "response_format")
        if not prompt_ids:
            raise InvalidEngineRequest("the prompt is empty", "prompt")
        if len(prompt_ids) + spec.max_tokens > self.info.max_model_len:
            raise InvalidEngineRequest("prompt plus max_tokens exceed the context", "max_tokens")

    async def generate(
        self, request_id: str, prompt_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerationUpdate]:
        """Generate ``spec.n`` choices, one token per running choice per update (DELTA outputs)."""
        self._check()
        self._validate(prompt_ids, spec)
        self.requests.append(request_id)
        self.active.add(request_id)
        sampling = SamplingOptions(spec.temperature, spec.top_p, spec.top_k, spec.min_p, spec.seed)
        choices = [
            _Choice(i, np.random.default_rng(None if spec.seed is None else spec.seed + i))
            for i in range(spec.n)
        ]
        stops = set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(self.info.eos_token_ids))
        hold = max((len(s) for s in spec.stop), default=1) - 1
        prompt_lps: list[TokenLogprob | None] | None = None
        if spec.prompt_logprobs is not None:
            prompt_lps = [None] + [
                self._token_logprob(self.logprobs(prompt_ids[:i]), prompt_ids[i], spec.prompt_logprobs)
                for i in range(1, len(prompt_ids))
            ]
        try:
            if spec.max_tokens == 0:
                deltas = [
                    ChoiceDelta(c.index, [], "", [] if spec.logprobs is not None else None, "length")
                    for c in choices
                ]
                yield GenerationUpdate(deltas, list(prompt_ids), prompt_lps, finished=True)
                return
            first = True
            while any(c.finish_reason is None for c in choices):
                await self._tick()
                deltas = []
                for c in choices:
                    if c.finish_reason is not None:
                        continue
                    deltas.append(self._advance(c, prompt_ids, spec, sampling, stops, hold))
                finished = all(c.finish_reason is not None for c in choices)
                yield GenerationUpdate(deltas, list(prompt_ids), prompt_lps if first else None, finished)
                first = False
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request_id)
            self.cancelled_event.set()
            raise
        finally:
            self.active.discard(request_id)

    def _advance(
        self,
        c: _Choice,
        prompt_ids: list[int],
        spec: SamplingSpec,
        sampling: SamplingOptions,
        stops: set[int],
        hold: int,
    ) -> ChoiceDelta:
        lps = self.logprobs([*prompt_ids, *c.token_ids])
        token = self._pick(lps, sampling, c.rng, spec.logit_bias)
        c.token_ids.append(token)
        logprobs = [self._token_logprob(lps, token, spec.logprobs)] if spec.logprobs is not None else None
        full = self._text(c.token_ids, spec.skip_special_tokens)
        if token in stops:
            c.finish_reason = "stop"
            c.stop_reason = None if token in self.info.eos_token_ids else token
        elif len(c.token_ids) >= spec.max_tokens:
            c.finish_reason = "length"
        for s in spec.stop:
            at = full.find(s, max(0, len(c.sent_text) - len(s)))
            if at >= 0:
                full, c.finish_reason, c.stop_reason = full[:at], "stop", s
                break
        # As vLLM does: hold back what could still become a stop string, and a partial UTF-8 character.
        upto = len(full) if c.finish_reason else max(len(c.sent_text), len(full) - hold)
        text = full[len(c.sent_text) : upto]
        if c.finish_reason is None and text.endswith("\ufffd"):
            text = text[:-1]
        c.sent_text += text
        return ChoiceDelta(c.index, [token], text, logprobs, c.finish_reason, c.stop_reason)

    # ---- decoder operations --------------------------------------------------------------------------

    def open_session(self, request_id: str) -> Session:
        """A new :class:`FakeSession`."""
        self._check()
        self.requests.append(request_id)
        return FakeSession(self, request_id)

    async def generate_block(self, request_id: str, op: GenerateOp) -> GeneratedBlock:
        """Up to ``op.max_tokens`` tokens after ``op.context``, each with the view that produced it."""
        self.requests.append(request_id)
        rng = np.random.default_rng(op.sampling.seed)
        stops = set(op.stop_token_ids) | set(self.info.eos_token_ids)
        context = [int(t) for t in op.context]
        tokens: list[int] = []
        views: list[StepView] = []
        finished = False
        while len(tokens) < op.max_tokens:
            await self._tick()
            lps = self.logprobs(context + tokens)
            token = self._pick(lps, op.sampling, rng, {})
            tokens.append(token)
            views.append(make_view(lps, op.want))
            if token in stops:
                finished = True
                break
        return GeneratedBlock(tokens, views, finished)

    async def score(self, request_id: str, op: ScoreOp) -> list[StepView]:
        """The views at positions ``op.start .. len(op.context)``."""
        self.requests.append(request_id)
        if op.start < 1 or op.start > len(op.context):
            raise InvalidEngineRequest(f"score start {op.start} outside 1..{len(op.context)}")
        await self._tick()
        ctx = tuple(int(t) for t in op.context)
        return [make_view(self.logprobs(ctx[:i]), op.want) for i in range(op.start, len(ctx) + 1)]

    async def reward(self, request_id: str, texts: list[str]) -> list[float]:
        """A deterministic score per text in [-1, 1) (a hash of the text and the seed)."""
        self.requests.append(request_id)
        await self._tick()
        self.rewards.extend(texts)
        out = []
        for text in texts:
            digest = hashlib.blake2b(f"{self.seed}:{text}".encode(), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") / 2**63 - 1.0)
        return out
