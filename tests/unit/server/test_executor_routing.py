"""The executor runs a decoder's blocks inside the role's session when the session can, and as new engine
requests when it cannot; the operation counter says which."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, ClassVar

from alignd.decoders.contract import (
    Finish,
    GeneratedBlock,
    GenerateOp,
    SamplingOptions,
    ScoreOp,
    StepView,
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
        return GeneratedBlock(token_ids=[7], views=[view], finished=False)


class BlockEngine(FakeEngine):
    """A fake engine whose sessions write greedy blocks."""

    def open_session(self, request_id: str) -> BlockSession:
        return BlockSession(self, request_id)


def _blocks() -> Generator[Any, Any, Finish]:
    (greedy,) = yield [GenerateOp("draft", (1, 2), 1)]
    sampled, scored = yield [
        GenerateOp("draft", (1, 2), 1, sampling=SamplingOptions(temperature=1.0, seed=3)),
        ScoreOp("other", (1, 2, 3), 1, ViewSpec(top_k=2)),
    ]
    assert greedy.token_ids == [7]  # the session's block
    assert len(sampled.token_ids) == 1 and len(scored) == 3  # the engine's requests
    assert all(isinstance(v, StepView) for v in scored)
    return Finish("stop")


async def test_blocks_run_in_sessions_that_can_and_as_requests_otherwise() -> None:
    draft, other = BlockEngine("draft"), FakeEngine("other")
    await draft.start()
    await other.start()
    ops: list[tuple[str, str]] = []
    BlockSession.generated = []
    executor = DecoderExecutor({"draft": draft, "other": other}, "req", on_op=lambda r, o: ops.append((r, o)))
    events = [e async for e in executor.run(_blocks())]
    assert events == [Finish("stop")]
    assert [op.sampling.temperature for op in BlockSession.generated] == [0.0]
    assert sorted(ops) == [("draft", "GenerateOp"), ("draft", "GenerateOp/session"), ("other", "ScoreOp")]
