"""The executor runs a decoder's blocks inside the role's session when the session can, and as new engine
requests when it cannot; the operation counter says which."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, ClassVar

from alignd.decoders.contract import (
    Finish,
    GeneratedBlock,
    GenerateOp,
    SamplingOptions,
    ScoreOp,
    StepView,
    ViewOp,
    ViewSpec,
)
from alignd.server.generation.executor import DecoderExecutor
from tests.support.fake_engine import FakeEngine, FakeSession, make_view


class BlockSession(FakeSession):
    """A session that writes greedy blocks itself and leaves scoring to the engine."""

    generated: ClassVar[list[GenerateOp]] = []

    async def generate(self, op: GenerateOp) -> GeneratedBlock | None:
        if op.sampling.temperature > 0:
            return None
        BlockSession.generated.append(op)
        view = make_view(self._engine.logprobs(op.context), op.want)
        return GeneratedBlock(token_ids=[7, 8, 9][: op.max_tokens], views=[view] * min(op.max_tokens, 3),
                              finished=False)


class BlockEngine(FakeEngine):
    """A fake engine whose sessions write greedy blocks."""

    def open_session(self, request_id: str) -> BlockSession:
        return BlockSession(self, request_id)


def _blocks() -> Generator[Any, Any, Finish]:
    (greedy,) = yield [GenerateOp("draft", (1, 2), 3)]
    sampled, scored = yield [
        GenerateOp("draft", (1, 2), 1, sampling=SamplingOptions(temperature=1.0, seed=3)),
        ScoreOp("other", (1, 2, 3), 1, ViewSpec(top_k=2)),
    ]
    assert greedy.token_ids == [7, 8, 9]  # the session's block
    assert len(sampled.token_ids) == 1 and len(scored) == 3  # the engine's requests
    assert all(isinstance(v, StepView) for v in scored)
    return Finish("stop")


async def test_blocks_run_in_sessions_that_can_and_as_requests_otherwise() -> None:
    draft, other = BlockEngine("draft"), FakeEngine("other")
    await draft.start()
    await other.start()
    ops: list[tuple[str, str, int]] = []
    BlockSession.generated = []
    executor = DecoderExecutor({"draft": draft, "other": other}, "req", on_op=lambda r, o, n: ops.append((r, o, n)))
    events = [e async for e in executor.run(_blocks())]
    assert events == [Finish("stop")]
    assert [op.sampling.temperature for op in BlockSession.generated] == [0.0]
    # a written block costs a forward step per token, a scored block one step
    assert sorted(ops) == [("draft", "GenerateOp", 1), ("draft", "GenerateOp/session", 3), ("other", "ScoreOp", 1)]


class OneAtATimeSession(FakeSession):
    """A session that records its views in order and fails if a second one enters while one runs (a real
    session moving to one position must not be moved to another meanwhile)."""

    def __init__(self, engine: FakeEngine, request_id: str) -> None:
        super().__init__(engine, request_id)
        self.busy = False

    async def view(self, context: Any, want: ViewSpec) -> StepView:
        assert not self.busy, "two views of one session at once"
        self.busy = True
        try:
            await asyncio.sleep(0.005)
            return await super().view(context, want)
        finally:
            self.busy = False


class OneAtATimeEngine(FakeEngine):
    """A fake engine whose sessions refuse concurrent views."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.opened: list[OneAtATimeSession] = []

    def open_session(self, request_id: str) -> OneAtATimeSession:
        session = OneAtATimeSession(self, request_id)
        self.opened.append(session)
        return session


async def test_a_role_asked_at_several_positions_in_one_batch_is_asked_in_order() -> None:
    """A speculative block's refinements may ask one role at several positions in one batch: its session
    takes them one at a time, in the batch's order, while other roles run alongside."""
    engine, other = OneAtATimeEngine("m"), OneAtATimeEngine("o")
    await engine.start()
    await other.start()
    want = ViewSpec(top_k=2)
    asked = [(1, 2, 3), (1, 2), (1, 2, 3, 4)]
    results: list[Any] = []

    def run() -> Generator[Any, Any, Finish]:
        results.extend((yield [*(ViewOp("a", c, want) for c in asked), ViewOp("b", (1,), want)]))
        return Finish("stop")

    executor = DecoderExecutor({"a": engine, "b": other}, "req")
    events = [e async for e in executor.run(run())]
    assert isinstance(events[-1], Finish)
    assert len(results) == 4
    assert [s.contexts for s in engine.opened] == [asked]
