"""The fake engine keeps the engine contract the server relies on (so the tier-2 tests mean something)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from alignd.decoders.contract import GenerateOp, SamplingOptions, ScoreOp, ViewSpec
from alignd.server.engines.base import EngineUnavailable, InvalidEngineRequest, SamplingSpec
from tests.support.fake_engine import FakeEngine

PROMPT = [3, 17, 42]


async def _started(**knobs: Any) -> FakeEngine:
    engine = FakeEngine("fake", vocab_size=64, eos_token_ids=(0,), **knobs)
    await engine.start()
    return engine


async def _collect(engine: FakeEngine, spec: SamplingSpec, prompt: list[int] = PROMPT) -> list[Any]:
    return [u async for u in engine.generate("r", prompt, spec)]


async def test_generate_streams_one_token_per_choice_per_update() -> None:
    engine = await _started()
    spec = SamplingSpec(
        max_tokens=5, n=2, temperature=1.0, seed=3, logprobs=2, ignore_eos=True, prompt_logprobs=1
    )
    updates = await _collect(engine, spec)
    assert [u.finished for u in updates] == [False] * (len(updates) - 1) + [True]
    assert all(len(c.token_ids) == 1 for u in updates for c in u.choices)
    tokens = {i: [t for u in updates for c in u.choices if c.index == i for t in c.token_ids] for i in (0, 1)}
    assert len(tokens[0]) == len(tokens[1]) == 5 and tokens[0] != tokens[1]
    assert {c.finish_reason for c in updates[-1].choices} == {"length"}
    lp = updates[0].choices[0].logprobs[0]
    assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.logprob <= lp.top[0][1]
    assert updates[0].prompt_logprobs is not None and len(updates[0].prompt_logprobs) == len(PROMPT)
    assert updates[0].prompt_logprobs[0] is None and updates[1].prompt_logprobs is None
    again = await _collect(engine, spec)
    assert [c.token_ids for u in again for c in u.choices] == [
        c.token_ids for u in updates for c in u.choices
    ]


async def test_generate_stops_on_stop_tokens_and_eos() -> None:
    engine = await _started()
    greedy = [
        c.token_ids[0]
        for u in await _collect(engine, SamplingSpec(max_tokens=6, temperature=0, ignore_eos=True))
        for c in u.choices
    ]
    stop_at = greedy[2]
    updates = await _collect(engine, SamplingSpec(max_tokens=6, temperature=0, stop_token_ids=[stop_at]))
    last = updates[-1].choices[0]
    produced = [c.token_ids[0] for u in updates for c in u.choices]
    assert produced == greedy[: greedy.index(stop_at) + 1]
    assert last.finish_reason == "stop" and last.stop_reason == stop_at
    # Biasing EOS to the top ends the generation at once, with no stop_reason (as vLLM reports EOS).
    eos = await _collect(engine, SamplingSpec(max_tokens=6, temperature=0, logit_bias={0: 100.0}))
    assert eos[-1].choices[0].token_ids == [0] and eos[-1].choices[0].finish_reason == "stop"
    assert eos[-1].choices[0].stop_reason is None


async def test_blocks_and_scores_agree_with_the_model() -> None:
    engine = await _started()
    want = ViewSpec(top_k=3)
    block = await engine.generate_block("r", GenerateOp("base", tuple(PROMPT), 4, want, SamplingOptions()))
    assert len(block.token_ids) == len(block.views) <= 4
    context = tuple(PROMPT) + tuple(block.token_ids)
    views = await engine.score("r", ScoreOp("base", context, len(PROMPT), want))
    assert len(views) == len(block.token_ids) + 1
    for view, generated, token in zip(views, block.views, block.token_ids):
        assert view.top()[0] == generated.top()[0] == token  # greedy picks the top token
        np.testing.assert_allclose(view.logprobs, generated.logprobs)
    session = engine.open_session("s")
    np.testing.assert_allclose((await session.view(context, want)).logprobs, views[-1].logprobs)
    assert engine.open_sessions == 1
    await session.close()
    await session.close()
    assert engine.open_sessions == 0
    with pytest.raises(InvalidEngineRequest):
        await engine.score("r", ScoreOp("base", context, 0, want))


async def test_rewards_are_deterministic() -> None:
    engine = await _started(task="reward")
    first = await engine.reward("r", ["good answer", "bad answer"])
    assert first == await engine.reward("r", ["good answer", "bad answer"])
    assert first[0] != first[1] and all(-1.0 <= r < 1.0 for r in first)
    with pytest.raises(InvalidEngineRequest):
        await _collect(engine, SamplingSpec(max_tokens=2))


async def test_knobs_start_failure_death_and_cancellation() -> None:
    held = FakeEngine("held", hold_start=True)
    starting = asyncio.create_task(held.start())
    await asyncio.sleep(0.01)
    assert not held.ready and not starting.done()
    held.finish_start()
    await starting
    assert held.ready

    failing = FakeEngine("bad", fail_on_start="no weights")
    with pytest.raises(Exception, match="no weights"):
        await failing.start()
    assert not failing.ready

    engine = await _started(token_delay=0.001)
    stream = engine.generate("slow", PROMPT, SamplingSpec(max_tokens=100, ignore_eos=True))
    await stream.__anext__()
    assert engine.active == {"slow"}
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.cancelled == ["slow"] and engine.cancelled_event.is_set() and not engine.active

    engine.die()
    assert not engine.ready
    with pytest.raises(EngineUnavailable):
        await engine.check_health()
    with pytest.raises(EngineUnavailable):
        await _collect(engine, SamplingSpec(max_tokens=2))
