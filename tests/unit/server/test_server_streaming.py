"""Responses and stream chunks for plain models and recipes, provenance traces, and client disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from alignd.server.app import create_app

CONTRASTIVE = {"decoder": "contrastive", "roles": {"expert": "tiny-base", "amateur": "tiny-amateur"}}
NUDGING = {
    "decoder": "nudging",
    "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
    "params": {"gamma": 0.3},
}
RECIPES = {"tiny-contrastive": CONTRASTIVE, "tiny-nudging": NUDGING}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _chunks(events: list[Any]) -> list[dict[str, Any]]:
    assert events and events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), chunks
    return chunks


async def test_chat_stream_chunks_match_the_whole_response(
    serve: Any, make_settings: Any, fake_engines: Any, sse_events: Any
) -> None:
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    async with serve(make_settings(), fake_engines()) as h:
        whole = (await h.client.post("/v1/chat/completions", json=body)).json()
        streamed = await h.client.post(
            "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _chunks(sse_events(streamed.text))
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"tiny-chat"}
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in content_chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in content_chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    assert all(c["usage"] is None for c in content_chunks)
    assert usage_chunk["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert content_chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["usage"] == whole["usage"]
    assert "alignment_trace" not in content_chunks[0]["choices"][0]


async def test_completion_stream_with_n_and_logprobs(
    serve: Any, make_settings: Any, fake_engines: Any, sse_events: Any
) -> None:
    body = {
        "model": "tiny-base",
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "n": 2,
        "logprobs": 2,
        "temperature": 1.0,
        "seed": 7,
        "ignore_eos": True,
        "stream": True,
    }
    async with serve(make_settings(), fake_engines()) as h:
        response = await h.client.post("/v1/completions", json=body)
    chunks = _chunks(sse_events(response.text))
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(len(c["choices"]) == 1 for c in chunks)
    by_index: dict[int, list[dict[str, Any]]] = {}
    for c in chunks:
        by_index.setdefault(c["choices"][0]["index"], []).append(c["choices"][0])
    assert sorted(by_index) == [0, 1]
    for choices in by_index.values():
        assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 6
        assert all(len(top) <= 2 for c in choices for top in c["logprobs"]["top_logprobs"])
        assert choices[-1]["finish_reason"] == "length"
        offsets = [o for c in choices for o in c["logprobs"]["text_offset"]]
        assert offsets == sorted(offsets) and offsets[0] == 0


async def test_recipe_returns_trace_spans(serve: Any, make_settings: Any, fake_engines: Any) -> None:
    async with serve(make_settings(recipes=RECIPES), fake_engines()) as h:
        card = (await h.client.get("/v1/models/tiny-nudging")).json()
        assert card["alignd"]["kind"] == "recipe" and card["alignd"]["decoder"] == "nudging"
        assert set(card["alignd"]["roles"]) == {"base", "aligner"}
        for recipe, roles in (("tiny-contrastive", {"expert"}), ("tiny-nudging", {"base", "aligner"})):
            body = {
                "model": recipe,
                "messages": MESSAGES,
                "max_tokens": 24,
                "temperature": 0,
                "alignment": {"trace": True},
            }
            response = await h.client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            trace = choice["alignment_trace"]
            spans = trace["spans"]
            assert spans and all(set(s) == {"text", "token_ids", "role", "reason"} for s in spans)
            assert {s["role"] for s in spans} == roles
            assert all(s["reason"] for s in spans)
            assert "".join(s["text"] for s in spans) == choice["message"]["content"]
            n_tokens = sum(len(s["token_ids"]) for s in spans)
            assert n_tokens == response.json()["usage"]["completion_tokens"]
            assert sum(trace["role_token_counts"].values()) == n_tokens
            assert sum(trace["role_token_share"].values()) == pytest.approx(1.0)
            # Without trace: no provenance in the response.
            plain = await h.client.post("/v1/chat/completions", json={**body, "alignment": None})
            assert "alignment_trace" not in plain.json()["choices"][0]
        for engine in h.engines.values():
            assert engine.open_sessions == 0
        assert h.engines["tiny-amateur"].sessions_opened > 0  # the amateur was asked at every step


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
async def test_recipe_stream_chunks_carry_spans(
    serve: Any, make_settings: Any, fake_engines: Any, endpoint: str, sse_events: Any
) -> None:
    body: dict[str, Any] = {
        "model": "tiny-nudging",
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "alignment": {"trace": True},
    }
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", MESSAGES
    else:
        path, body["prompt"] = "/v1/completions", "Question: What is the color of the sky? Answer:"
    async with serve(make_settings(recipes=RECIPES), fake_engines()) as h:
        whole = (await h.client.post(path, json={**body, "stream": False})).json()
        chunks = _chunks(sse_events((await h.client.post(path, json=body)).text))
    spans = []
    text = ""
    for c in chunks:
        choice = c["choices"][0]
        assert set(choice["alignment_trace"]) == {"spans"}
        spans += choice["alignment_trace"]["spans"]
        piece = choice["delta"].get("content", "") if endpoint == "chat" else choice["text"]
        assert piece == "".join(s["text"] for s in choice["alignment_trace"]["spans"])
        text += piece
    assert spans == whole["choices"][0]["alignment_trace"]["spans"]
    assert text == (
        whole["choices"][0]["message"]["content"] if endpoint == "chat" else whole["choices"][0]["text"]
    )


async def _run_until_disconnect(
    app: Any, path: str, body: dict[str, Any], engine: Any, stream: bool
) -> list[dict[str, Any]]:
    """Drive the ASGI app as uvicorn does (spec 2.3); disconnect after the first body chunk of a stream,
    or once the engine has generated a few tokens of a whole response."""
    raw = json.dumps({**body, "stream": stream}).encode()
    first_chunk = asyncio.Event()
    disconnect = asyncio.Event()
    sent: list[dict[str, Any]] = []
    request_read = False

    async def receive() -> dict[str, Any]:
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("alignd.test", 80),
    }
    task = asyncio.create_task(app(scope, receive, send))
    if stream:
        await asyncio.wait_for(first_chunk.wait(), 10)
    else:
        while engine.steps < 5:
            await asyncio.sleep(0.005)
    disconnect.set()
    await asyncio.wait_for(task, 10)
    return sent


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("target", ["plain", "recipe"])
async def test_client_disconnect_cancels_generation(
    make_settings: Any, fake_engines: Any, target: str, stream: bool
) -> None:
    engines = fake_engines(token_delay=0.01)
    app = create_app(make_settings(recipes=RECIPES), engines=dict(engines))
    model = "tiny-base" if target == "plain" else "tiny-contrastive"
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 500,
        "ignore_eos": True,
        "temperature": 0,
    }
    base = engines["tiny-base"]
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.start_task, 10)
        sent = await _run_until_disconnect(app, "/v1/completions", body, base, stream)
        if target == "plain":
            await asyncio.wait_for(base.cancelled_event.wait(), 5)
            assert len(base.cancelled) == 1 and base.cancelled[0] == base.requests[-1]
            assert not base.active
        else:
            assert engines["tiny-amateur"].sessions_opened == base.sessions_opened == 1
        steps = base.steps
        assert 0 < steps < 100
        await asyncio.sleep(0.1)
        assert base.steps == steps  # nothing runs on
        assert all(e.open_sessions == 0 for e in engines.values())
        assert app.state.in_flight == 0
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if stream:
        assert body_bytes.startswith(b"data: ") and b"[DONE]" not in body_bytes
        assert body_bytes.count(b"data: ") < 100  # stopped long before 500 tokens
    else:
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 499  # nobody reads it; logged as nginx's "client closed request"
        assert json.loads(body_bytes)["error"]["type"] == "client_closed_request"
