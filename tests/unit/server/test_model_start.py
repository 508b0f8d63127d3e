"""Server start-up: the models' engines start side by side, except those that must start alone, and the first
failure stops the rest (``ModelPool.start``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from alignd.server.engines.base import EngineError
from alignd.server.models import ModelPool


async def _until(condition: Any, timeout: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds (fail after ``timeout`` seconds)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def _calls(engines: dict[str, Any]) -> dict[str, int]:
    return {name: engine.start_calls for name, engine in engines.items()}


async def test_models_start_side_by_side(make_settings: Any, fake_engines: Any) -> None:
    engines = fake_engines(hold_start=True)
    pool = ModelPool(make_settings(), engines)
    starting = asyncio.create_task(pool.start())
    # every engine is starting before any has finished
    await _until(lambda: all(n == 1 for n in _calls(engines).values()))
    assert not pool.ready
    for engine in engines.values():
        engine.finish_start()
    await starting
    assert pool.ready and pool.error is None


async def test_engines_that_must_start_alone_start_one_after_another(make_settings: Any, fake_engines: Any) -> None:
    engines = fake_engines(hold_start=True)
    engines["tiny-chat"].starts_alone = True
    engines["tiny-amateur"].starts_alone = True
    pool = ModelPool(make_settings(), engines)
    starting = asyncio.create_task(pool.start())
    # the others start beside the first of those that start alone; the next waits for it
    await _until(lambda: _calls(engines) == {"tiny-base": 1, "tiny-chat": 1, "tiny-amateur": 0})
    engines["tiny-base"].finish_start()
    await asyncio.sleep(0.05)
    assert engines["tiny-amateur"].start_calls == 0
    engines["tiny-chat"].finish_start()
    await _until(lambda: engines["tiny-amateur"].start_calls == 1)
    assert not pool.ready
    engines["tiny-amateur"].finish_start()
    await starting
    assert pool.ready


async def test_a_model_that_fails_to_start_stops_the_others(make_settings: Any, fake_engines: Any) -> None:
    engines = fake_engines(hold_start=True)
    engines["tiny-chat"].finish_start()
    engines["tiny-chat"].fail_on_start = "cannot load weights"
    pool = ModelPool(make_settings(), engines)
    with pytest.raises(EngineError, match="cannot load weights"):
        await pool.start()
    assert isinstance(pool.error, EngineError) and not pool.loading and not pool.ready
    # the engines still starting were cancelled, not left loading in the background
    assert _calls(engines) == {"tiny-base": 1, "tiny-chat": 1, "tiny-amateur": 1}
    assert not any(engine.ready for engine in engines.values())
    engines["tiny-base"].finish_start()
    await asyncio.sleep(0.05)
    assert not engines["tiny-base"].ready
