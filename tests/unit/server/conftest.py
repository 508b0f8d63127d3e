"""Tier-2 server tests: the FastAPI app in process, behind ``httpx.ASGITransport``, on fake engines.

The tokenizers are the tiny generated models' (``tests.support.tiny_models``); the engines are
:class:`tests.support.fake_engine.FakeEngine`. ``serve(settings, engines)`` runs the app's lifespan (model
start-up in the background, shutdown at exit) around an ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from alignd.server.app import create_app
from alignd.server.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.tiny_models import ensure_tiny_models

ERROR_KEYS = {"message", "type", "param", "code"}


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an OpenAI error body with ``status`` (and ``code``); return its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def _sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` stays a string)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@dataclass
class Harness:
    """A running in-process app: the app, a client on it, and its fake engines."""

    app: FastAPI
    client: httpx.AsyncClient
    engines: dict[str, FakeEngine]

    async def started(self, timeout: float = 10.0) -> None:
        """Wait until model start-up has ended (successfully or not)."""
        await asyncio.wait({self.app.state.start_task}, timeout=timeout)
        assert self.app.state.start_task.done(), "model start-up did not end"


Serve = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture
def assert_error() -> Callable[..., dict[str, Any]]:
    """``assert_error(response, status, code=None)``: assert an OpenAI error body; return its ``error``."""
    return _assert_error


@pytest.fixture
def sse_events() -> Callable[[str], list[Any]]:
    """``sse_events(text)``: the JSON payloads of an SSE body (``[DONE]`` stays a string)."""
    return _sse_events


@pytest.fixture(scope="session")
def tiny_paths() -> dict[str, Path]:
    """The tiny generated models (built once per machine)."""
    return ensure_tiny_models()


@pytest.fixture
def make_settings(tiny_paths: dict[str, Path]) -> Callable[..., Settings]:
    """``make_settings(server={...}, recipes={...}, models=[names])``: settings on the tiny models."""

    def make(
        *,
        server: Mapping[str, Any] | None = None,
        recipes: Mapping[str, Any] | None = None,
        models: list[str] | None = None,
    ) -> Settings:
        names = models or ["tiny-base", "tiny-chat", "tiny-amateur"]
        return Settings(
            models={n: {"path": str(tiny_paths[n]), "max_model_len": 1024} for n in names},
            recipes=dict(recipes or {}),
            server=dict(server or {}),
        )

    return make


@pytest.fixture
def fake_engines(tiny_paths: dict[str, Path]) -> Callable[..., dict[str, FakeEngine]]:
    """``fake_engines(names, **knobs)``: one :class:`FakeEngine` per tiny model, all with the same knobs."""

    def make(names: list[str] | None = None, **knobs: Any) -> dict[str, FakeEngine]:
        names = names or ["tiny-base", "tiny-chat", "tiny-amateur"]
        return {
            n: FakeEngine.from_path(n, tiny_paths[n], seed=i + 1, max_model_len=1024, **knobs)
            for i, n in enumerate(names)
        }

    return make


@pytest.fixture
def serve() -> Serve:
    """``async with serve(settings, engines, wait=True) as h``: the app with its lifespan running."""

    @asynccontextmanager
    async def run(
        settings: Settings, engines: dict[str, FakeEngine], *, wait: bool = True
    ) -> AsyncIterator[Harness]:
        app = create_app(settings, engines=dict(engines))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://alignd.test", timeout=20
            ) as client:
                harness = Harness(app, client, engines)
                if wait:
                    await harness.started()
                yield harness

    return run
