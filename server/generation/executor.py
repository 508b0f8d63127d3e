"""Runs a decoder's sans-IO generator against the engines.

The order of one decoder step, as it runs here:

1. resume the decoder generator with the results of its previous operations;
2. it yields either an :class:`Emit` (passed on to the caller at once, so streaming follows decisions) or
   a list of engine operations;
3. the operations run concurrently (``asyncio.gather``; those of one role one after another, in order, since
   a session is one sequence in the engine): every :class:`ViewOp` goes to the open session of
   its role (vLLM streaming input: the KV cache stays, only new tokens are sent), and so do
   :class:`GenerateOp` and :class:`ScoreOp` where the session can run them (a greedy block written natively,
   a block scored as one appended chunk), else they become native vLLM requests; :class:`RewardOp` becomes a
   pooling request; operations of all live requests meet in vLLM's scheduler, which batches them. The
   sessions of one engine that step in one batch (views, scored chunks) are told they belong together
   (:meth:`Session.join_step`), so the engine computes them in one step
   (:mod:`alignd.server.engines.vllm_plugin`). When a batch of views
   advances some roles by the same tokens while other sessions of the run stand at the same output position
   (a decoder that asks those roles later in the step, as ARGS asks its reward roles about the base's
   candidates), those sessions are advanced in the same engine step with a broad view (full on a small
   vocabulary, top-128 otherwise); the later view is answered from it when it holds what is asked;
4. back to 1, until the generator returns :class:`Finish`; sessions are closed however the run ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from alignd.decoders.contract import (
    DecoderRun,
    Emit,
    EngineOp,
    Finish,
    GenerateOp,
    RewardOp,
    ScoreOp,
    ViewOp,
    ViewSpec,
)
from alignd.server.engines.base import Engine, Session

__all__ = ["DecoderExecutor"]

_FULL_PREFETCH_VOCAB = 4096  # up to this vocabulary size a prefetched view is the full distribution
_PREFETCH_TOP_K = 128


class DecoderExecutor:
    """Executes one decoder run: role name -> engine, with one open session per role.

    ``on_op(role, kind, steps)`` hears of every operation run: its kind (``ViewOp``, ``GenerateOp/session``
    for a block written inside the session, ...) and the forward steps it asked of the engine (a view, a
    scored block or a reward batch is one step, a written block one per token).
    """

    def __init__(
        self,
        engines: Mapping[str, Engine],
        request_id: str,
        format_reward_pair: Callable[[str, str, str], str] | None = None,
        on_op: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.engines = engines
        self.request_id = request_id
        self._sessions: dict[str, Session] = {}
        self._prefetch: dict[str, tuple[tuple[int, ...], asyncio.Task[Any]]] = {}
        self._format_reward_pair = format_reward_pair or (lambda _role, p, r: p + r)
        self._on_op = on_op
        self._groups = 0
        self._role_locks: dict[str, asyncio.Lock] = {}

    async def _run_op(self, op: EngineOp) -> Any:
        if not isinstance(op, (ViewOp, GenerateOp, ScoreOp)):
            return await self._run_role_op(op)
        # A batch may ask one role at several positions (a speculative block's refinements): its session
        # takes them one at a time, as a session moving to one position must not be moved by another.
        lock = self._role_locks.get(op.role)
        if lock is None:
            lock = self._role_locks[op.role] = asyncio.Lock()
        async with lock:
            return await self._run_role_op(op)

    async def _run_role_op(self, op: EngineOp) -> Any:
        engine = self.engines[op.role]
        if isinstance(op, (ViewOp, GenerateOp, ScoreOp)):
            pre = self._prefetch.pop(op.role, None)
            if pre is not None:
                # a failed prefetch is not this op's failure: the session asks again and reports its own
                await asyncio.gather(pre[1], return_exceptions=True)
        result: Any = None
        in_session = True
        if isinstance(op, ViewOp):
            result = await self._session(op.role).view(op.context, op.want)
        elif isinstance(op, GenerateOp):
            result = await self._session(op.role).generate(op)
            if result is None:
                in_session, result = False, await engine.generate_block(self.request_id, op)
        elif isinstance(op, ScoreOp):
            result = await self._session(op.role).score(op)
            if result is None:
                in_session, result = False, await engine.score(self.request_id, op)
        elif isinstance(op, RewardOp):
            texts = [self._format_reward_pair(op.role, p, r) for p, r in op.pairs]
            in_session, result = False, await engine.reward(self.request_id, texts)
        else:
            raise TypeError(f"unknown engine operation {op!r}")
        if self._on_op is not None:
            # a block written or scored inside a session is counted apart from one that took a new request
            kind = type(op).__name__
            steps = len(result.token_ids) if isinstance(op, GenerateOp) else 1
            self._on_op(op.role, f"{kind}/session" if in_session and not isinstance(op, ViewOp) else kind, steps)
        return result

    def _session(self, role: str) -> Session:
        session = self._sessions.get(role)
        if session is None:
            session = self._sessions[role] = self.engines[role].open_session(f"{self.request_id}-{role}")
        return session

    def _group_steps(self, ops: list[EngineOp], prefetched: list[str]) -> None:
        """Tell the sessions of one engine that step together in this batch (views and scored chunks, except
        those a prefetch already answers, and the prefetches just started) that they belong together, so
        the engine computes them in one step."""
        by_engine: dict[int, dict[int, Session]] = {}
        for role in [op.role for op in ops if isinstance(op, (ViewOp, ScoreOp)) and op.role not in self._prefetch]:
            session = self._session(role)
            by_engine.setdefault(id(self.engines[role]), {})[id(session)] = session
        for role in prefetched:
            by_engine.setdefault(id(self.engines[role]), {})[id(self._sessions[role])] = self._sessions[role]
        for members in by_engine.values():
            sessions = list(members.values())  # a role asked twice in a batch steps once at a time
            if len(sessions) > 1:
                self._groups += 1
                group = f"{self.request_id}-{self._groups}"
                for session in sessions:
                    session.join_step(group, len(sessions))

    def _start_prefetch(self, ops: list[EngineOp]) -> list[str]:
        """Advance idle sessions that stand where the batch's roles stand by the batch's new tokens."""
        if not ops or not all(isinstance(op, ViewOp) for op in ops):
            return []
        deltas: set[tuple[int, ...]] = set()
        positions: set[tuple[int, tuple[int, ...]]] = set()
        for op in ops:
            held = getattr(self._sessions.get(op.role), "context", None)
            if held is None or len(op.context) <= len(held) or tuple(op.context[: len(held)]) != held:
                return []
            appended = self._sessions[op.role].appended  # type: ignore[attr-defined]
            deltas.add(tuple(op.context[len(held):]))
            positions.add((appended, held[len(held) - appended:]))
        if len(deltas) != 1 or len(positions) != 1:
            return []
        (delta,), (position,) = deltas, positions
        asked = {op.role for op in ops}
        started: list[str] = []
        for role, session in self._sessions.items():
            held = getattr(session, "context", None)
            if role in asked or role in self._prefetch or held is None:
                continue
            appended = session.appended  # type: ignore[attr-defined]
            if (appended, held[len(held) - appended:]) != position:
                continue
            vocab = self.engines[role].info.vocab_size
            want = ViewSpec(full=True) if vocab <= _FULL_PREFETCH_VOCAB else ViewSpec(top_k=_PREFETCH_TOP_K)
            context = held + delta
            self._prefetch[role] = (context, asyncio.ensure_future(session.view(context, want)))
            started.append(role)
        return started

    async def run(self, run: DecoderRun) -> AsyncIterator[Emit | Finish]:
        """Drive ``run`` to the end, yielding its emits and finally its :class:`Finish`."""
        send: Any = None
        try:
            while True:
                try:
                    item = run.send(send)
                except StopIteration as stop:
                    finish = stop.value if isinstance(stop.value, Finish) else Finish("stop")
                    yield finish
                    return
                if isinstance(item, Emit):
                    send = None
                    yield item
                    continue
                ops = list(item)
                self._group_steps(ops, self._start_prefetch(ops))
                if len(ops) == 1:
                    send = [await self._run_op(ops[0])]
                else:
                    send = list(await asyncio.gather(*(self._run_op(op) for op in ops)))
        finally:
            run.close()
            for _, task in self._prefetch.values():
                task.cancel()
            await asyncio.gather(*(t for _, t in self._prefetch.values()), return_exceptions=True)
            self._prefetch.clear()
            sessions, self._sessions = self._sessions, {}
            for session in sessions.values():
                await session.close()
