"""Sessions of one engine that a decoder steps together are marked as one group, and the engine core
plugin waits for a group's missing chunks (bounded) before it steps."""

from __future__ import annotations

import queue
from collections.abc import Generator
from types import SimpleNamespace
from typing import Any

from alignd.decoders.contract import Emit, Finish, ScoreOp, StepView, ViewOp, ViewSpec
from alignd.server.engines.vllm_plugin import STEP_GROUP_KEY, await_groups, await_inputs, returning_sessions
from alignd.server.generation.executor import DecoderExecutor
from tests.support.fake_engine import FakeEngine, FakeSession


def _two_steps() -> Generator[Any, Any, Finish]:
    want = ViewSpec(top_k=2)
    yield [ViewOp("expert", (1, 2), want), ViewOp("amateur", (1, 3), want), ViewOp("other", (1,), want)]
    yield Emit(role="expert", reason="", token_ids=(4,), text="x")
    yield [ViewOp("expert", (1, 2, 4), want), ViewOp("other", (1, 4), want)]
    return Finish("stop")


async def test_sessions_of_one_engine_stepped_together_share_a_group() -> None:
    shared, alone = FakeEngine("shared"), FakeEngine("alone")
    await shared.start()
    await alone.start()
    opened: dict[str, FakeSession] = {}
    executor = DecoderExecutor({"expert": shared, "amateur": shared, "other": alone}, "req")
    original = executor._session

    def session(role: str) -> Any:
        s = original(role)
        opened[role] = s
        return s

    executor._session = session  # type: ignore[method-assign]
    events = [e async for e in executor.run(_two_steps())]
    assert isinstance(events[-1], Finish)
    (g1,), (g2,) = opened["expert"].groups, opened["amateur"].groups
    assert g1 == g2 and g1[1] == 2  # the first step: both sessions of the shared engine, one group
    assert opened["other"].groups == []  # alone on its engine, and the second step has one view per engine


def test_await_groups_takes_inputs_until_the_group_is_complete() -> None:
    groups = {"g": [1, 3]}
    inputs: queue.Queue[Any] = queue.Queue()
    for item in ("g", "g", "later"):
        inputs.put(item)
    handled: list[str] = []

    def handle(item: str) -> None:
        handled.append(item)
        if item in groups:
            groups[item][0] += 1

    await_groups(groups, inputs, handle, timeout=5.0)
    assert handled == ["g", "g"] and groups == {}
    assert inputs.get_nowait() == "later"  # what belongs to the next step stays queued


def test_await_groups_gives_up_on_a_member_that_never_comes() -> None:
    groups = {"g": [1, 2]}
    inputs: queue.Queue[Any] = queue.Queue()
    handled: list[Any] = []
    await_groups(groups, inputs, handled.append, timeout=0.01)
    assert handled == [] and groups == {}


class _Request:
    def __init__(self, status: Any, resumable: bool = True) -> None:
        self.status, self.resumable = status, resumable


class _Scheduler:
    def __init__(self, requests: dict[str, _Request], running: list[str] | None = None) -> None:
        self.requests, self.running = requests, running or []


def test_the_engine_waits_for_sessions_of_the_last_step_only_when_nothing_else_runs() -> None:
    from vllm.v1.request import RequestStatus

    idle, queued = RequestStatus.WAITING_FOR_STREAMING_REQ, RequestStatus.WAITING
    sched = _Scheduler({"a": _Request(idle), "b": _Request(queued), "native": _Request(queued, resumable=False)})
    pending = returning_sessions(sched, ("a", "b", "gone"))
    assert pending is not None and pending()  # "a" has not sent its next chunk yet
    sched.requests["a"].status = queued  # its chunk arrived
    assert not pending()
    assert returning_sessions(sched, ("b",)) is None  # nobody of the last step is missing
    assert returning_sessions(_Scheduler(sched.requests, running=["native"]), ("a",)) is None


def test_await_inputs_stops_when_nothing_is_pending_or_at_the_timeout() -> None:
    inputs: queue.Queue[Any] = queue.Queue()
    for item in ("x", "y", "later"):
        inputs.put(item)
    handled: list[str] = []
    await_inputs(lambda: "y" not in handled, inputs, handled.append, timeout=5.0)
    assert handled == ["x", "y"] and inputs.get_nowait() == "later"
    await_inputs(lambda: True, inputs, handled.append, timeout=0.01)  # nothing comes: returns at the timeout
    assert handled == ["x", "y"]


def _scored_block() -> Generator[Any, Any, Finish]:
    want = ViewSpec(top_k=2)
    yield [ScoreOp("expert", (1, 2, 7, 8), 2, want), ScoreOp("amateur", (1, 3, 7, 8), 2, want)]
    return Finish("stop")


async def test_scored_chunks_of_one_engine_share_a_group() -> None:
    """A block that every role scores at once (prompt-lookup drafts) steps as one group per engine."""
    shared = FakeEngine("shared")
    await shared.start()
    opened: dict[str, FakeSession] = {}
    executor = DecoderExecutor({"expert": shared, "amateur": shared}, "req")
    original = executor._session

    def session(role: str) -> Any:
        opened[role] = s = original(role)
        return s

    executor._session = session  # type: ignore[method-assign]
    events = [e async for e in executor.run(_scored_block())]
    assert isinstance(events[-1], Finish)
    (g1,), (g2,) = opened["expert"].groups, opened["amateur"].groups
    assert g1 == g2 and g1[1] == 2


async def test_a_session_sends_its_group_with_the_scored_chunk() -> None:
    import numpy as np

    from alignd.server.engines.vllm_local import _ChunkRows, _LocalSession, _RawRow

    engine: Any = SimpleNamespace(
        rewind_block=16, rewinds=0, chunk_scoring=True, info=SimpleNamespace(vocab_size=16),
    )
    session = _LocalSession(engine, "r")
    session._outputs = SimpleNamespace()  # type: ignore[assignment]
    session._context = [1, 2, 3, 4]
    want = ViewSpec(top_k=2)
    session._last = (want, StepView(logprobs=np.array([-0.1, -2.0]), token_ids=np.array([5, 3])))
    ids = np.tile(np.array([5, 5, 3]), (6, 1))
    lps = np.tile(np.array([-0.1, -0.1, -2.0]), (6, 1))
    sent: list[Any] = []

    async def append(context: list[int], params: Any) -> Any:
        sent.append((context[len(session._context):], params.extra_args.get(STEP_GROUP_KEY), params.prompt_logprobs))
        return SimpleNamespace(outputs=[SimpleNamespace(logprobs=[_RawRow((ids[0], lps[0]))])],
                               prompt_logprobs=_ChunkRows(ids, lps))

    session._append = append  # type: ignore[method-assign]
    session.join_step("g7", 2)
    views = await session.score(ScoreOp("r", (1, 2, 3, 4, 5, 5), 4, want))
    assert views is not None and len(views) == 3  # at the first position (from its last view), then the chunk's
    assert sent == [([5, 5], ["g7", 2], 2)]
    assert session._group is None  # the group is spent on that chunk
