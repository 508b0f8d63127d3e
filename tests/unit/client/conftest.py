"""A fake alignd server behind ``httpx.MockTransport``, and canned API payloads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest

from alignd.client import _client

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """Answers each route from a queue of replies (the last one repeats) and records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *replies: Reply) -> FakeServer:
        self.routes[(method, path)] = list(replies)
        return self

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.routes.get((request.method, request.url.path))
        if not queue:
            return httpx.Response(404, json=error_body(f"no route {request.url.path}", "not_found_error"))
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(request)
        return reply

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def body(self, i: int = -1) -> dict[str, Any]:
        """The JSON body of request ``i``."""
        return json.loads(self.requests[i].content)


def error_body(message: str, etype: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def span(text: str, role: str, reason: str = "", token_ids: Iterable[int] = ()) -> dict[str, Any]:
    return {"text": text, "token_ids": list(token_ids), "role": role, "reason": reason}


def chat_result(
    text: str,
    *,
    spans: list[dict[str, Any]] | None = None,
    share: dict[str, float] | None = None,
    finish: str = "stop",
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
    }
    if spans is not None:
        choice["alignment_trace"] = {"spans": spans, "role_token_share": share or {}}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def completion_result(
    text: str, *, spans: list[dict[str, Any]] | None = None, share: dict[str, float] | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "length"}
    if spans is not None:
        choice["alignment_trace"] = {"spans": spans, "role_token_share": share or {}}
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7},
    }


def chat_chunk(
    content: str | None,
    *,
    spans: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    if spans is not None:
        choice["alignment_trace"] = {"spans": spans}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }


def completion_chunk(
    text: str, *, spans: list[dict[str, Any]] | None = None, finish: str | None = None
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    if spans is not None:
        choice["alignment_trace"] = {"spans": spans}
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}


def sse(*chunks: dict[str, Any] | str, done: bool = True) -> bytes:
    """An SSE body: one ``data:`` event per chunk, then ``data: [DONE]``."""
    events = [c if isinstance(c, str) else json.dumps(c) for c in chunks]
    if done:
        events.append("[DONE]")
    return "".join(f"data: {e}\n\n" for e in events).encode()


def sse_response(*chunks: dict[str, Any] | str, done: bool = True) -> httpx.Response:
    return httpx.Response(200, content=sse(*chunks, done=done), headers={"content-type": "text/event-stream"})


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "tiny-base",
            "object": "model",
            "created": 1,
            "owned_by": "alignd",
            "alignd": {
                "kind": "model",
                "task": "generate",
                "engine": "local",
                "base_model": True,
                "ready": True,
            },
        },
        {
            "id": "tiny-chat",
            "object": "model",
            "created": 1,
            "owned_by": "alignd",
            "alignd": {
                "kind": "model",
                "task": "generate",
                "engine": "local",
                "base_model": False,
                "ready": True,
            },
        },
        {
            "id": "tiny-nudging",
            "object": "model",
            "created": 1,
            "owned_by": "alignd",
            "alignd": {
                "kind": "recipe",
                "decoder": "nudging",
                "roles": {
                    "base": {"model": "tiny-base"},
                    "aligner": {"model": "tiny-chat", "system_prompt": "Be kind."},
                },
                "params": {"gamma": 0.4},
                "description": "the base, nudged by the chat model",
            },
        },
    ],
}

DECODERS = {
    "object": "list",
    "data": [
        {
            "name": "nudging",
            "description": "Base writes; aligner nudges where the base is unsure.\nMore.",
            "shared_vocab": False,
            "roles": [
                {"name": "base", "description": "writes", "task": "generate", "optional": False},
                {"name": "aligner", "description": "nudges", "task": "generate", "optional": False},
            ],
            "params_schema": {
                "type": "object",
                "properties": {
                    "gamma": {"type": "number", "default": 0.4, "description": "top-1 probability cut"}
                },
            },
        },
        {
            "name": "args",
            "description": "Reward-guided search.",
            "shared_vocab": True,
            "roles": [
                {"name": "base", "description": "proposes", "task": "generate", "optional": False},
                {"name": "reward", "description": "scores", "task": "reward", "optional": True},
            ],
            "params_schema": {"type": "object", "properties": {"k": {"type": "integer", "default": 10}}},
        },
    ],
}


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the client's retry waits instead of waiting."""
    waited: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(_client, "_sleep", waited.append)
    monkeypatch.setattr(_client, "_async_sleep", async_sleep)
    return waited


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ALIGND_BASE_URL", "ALIGND_API_KEY", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
