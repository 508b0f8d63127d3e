"""Streaming: SSE parsing, events with provenance, running results, errors inside a stream."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from alignd.client import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    AsyncClient,
    AsyncStream,
    BadRequestError,
    Client,
    Stream,
    StreamEvent,
)
from alignd.client._streaming import ServerSentEvent, SSEDecoder

from .conftest import FakeServer, chat_chunk, completion_chunk, error_body, span, sse, sse_response


def decode_all(lines: list[str]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = [e for line in lines if (e := decoder.decode(line)) is not None]
    last = decoder.flush()
    return events + ([last] if last else [])


def test_sse_decoder_follows_the_event_stream_format() -> None:
    lines = [
        ": keep-alive",
        "",
        "data: a",
        "data:b",
        "",
        "event: error",
        "data: {}\r",
        "",
        "id: 3",
        "",
        "data: tail",
    ]
    assert decode_all(lines) == [
        ServerSentEvent("a\nb"),
        ServerSentEvent("{}", "error"),
        ServerSentEvent("tail"),
    ]


def client_for(server: FakeServer) -> Client:
    return Client("http://alignd.test", transport=server.transport, max_retries=0)


def traced_chat_stream() -> httpx.Response:
    return sse_response(
        chat_chunk("", finish=None),  # the usual first chunk: the assistant role, no text
        chat_chunk(
            "The sky",
            spans=[span("The", "base", "top-1 p=0.9", [1]), span(" sky", "base", "top-1 p=0.8", [2])],
        ),
        chat_chunk(
            " is blue",
            spans=[
                span(" is", "aligner", "nudged: base p=0.2 < 0.4", [3]),
                span(" blue", "base", "top-1 p=0.7", [4]),
            ],
        ),
        chat_chunk(None, finish="stop"),
        {
            "id": "x",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        },
    )


def test_chat_stream_yields_one_event_per_span(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", traced_chat_stream())
    stream = client_for(server).chat("Q", model="rec", stream=True, trace=True)
    assert isinstance(stream, Stream)
    assert server.body()["stream"] is True and server.body()["alignment"] == {"trace": True}
    events = list(stream)
    assert [(e.text, e.role, e.reason) for e in events] == [
        ("The", "base", "top-1 p=0.9"),
        (" sky", "base", "top-1 p=0.8"),
        (" is", "aligner", "nudged: base p=0.2 < 0.4"),
        (" blue", "base", "top-1 p=0.7"),
        ("", None, None),
    ]
    assert events[-1].finish_reason == "stop"
    assert events[2].token_ids == [3]
    assert stream.text == "The sky is blue"
    assert stream.finish_reason == "stop"
    assert [s.role for s in stream.spans] == ["base", "base", "aligner", "base"]
    assert stream.role_token_share == {"base": 0.75, "aligner": 0.25}
    assert stream.usage is not None and stream.usage.total_tokens == 9
    assert stream.response.is_closed


def test_stream_without_trace_yields_chunk_text(server: FakeServer) -> None:
    server.on(
        "POST",
        "/v1/completions",
        sse_response(completion_chunk("Once"), completion_chunk(" upon", finish="length")),
    )
    with client_for(server).complete("Q", model="m", stream=True) as stream:
        events = list(stream)
    assert events == [StreamEvent(text="Once"), StreamEvent(text=" upon", finish_reason="length")]
    assert stream.text == "Once upon" and stream.spans == [] and stream.role_token_share == {}


def test_spans_that_do_not_add_up_keep_the_chunk_text(server: FakeServer) -> None:
    server.on(
        "POST",
        "/v1/completions",
        sse_response(
            completion_chunk("ab", spans=[span("a", "base", "r1")]),
            completion_chunk("cde", spans=[span("c", "base"), span("d", "aligner")], finish="stop"),
        ),
    )
    events = list(client_for(server).complete("Q", model="m", stream=True, trace=True))
    assert [(e.text, e.role, e.reason) for e in events] == [("ab", "base", "r1"), ("cde", None, None)]


def test_stream_split_across_network_chunks(server: FakeServer) -> None:
    body = sse(chat_chunk("Hel"), chat_chunk("lo", finish="stop"))

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    server.on("POST", "/v1/chat/completions", httpx.Response(200, content=pieces()))
    stream = client_for(server).chat("Q", model="m", stream=True)
    assert "".join(e.text for e in stream) == "Hello"


def test_error_inside_a_stream_raises_the_mapped_exception(server: FakeServer) -> None:
    error = error_body("role base: prompt too long", "invalid_request_error", param="messages")
    error["error"]["code"] = 400
    server.on("POST", "/v1/chat/completions", sse_response(chat_chunk("Hi"), error, done=False))
    stream = client_for(server).chat("Q", model="m", stream=True)
    assert next(stream).text == "Hi"
    with pytest.raises(BadRequestError, match="prompt too long") as info:
        next(stream)
    assert info.value.param == "messages"

    server.on("POST", "/v1/chat/completions", sse_response(error_body("engine died", "internal_error")))
    with pytest.raises(APIStatusError, match="engine died") as info2:
        list(client_for(server).chat("Q", model="m", stream=True))
    assert info2.value.status_code == 500


def test_truncated_stream_is_an_error_but_a_finished_one_is_not(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", sse_response(chat_chunk("Hal"), done=False))
    with pytest.raises(APIResponseError, match="ended before"):
        list(client_for(server).chat("Q", model="m", stream=True))
    server.on("POST", "/v1/chat/completions", sse_response(chat_chunk("Hal", finish="length"), done=False))
    assert client_for(server).chat("Q", model="m", stream=True).until_done().text == "Hal"


def test_garbage_chunk_is_a_response_error(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", sse_response("{not json"))
    with pytest.raises(APIResponseError, match="unreadable stream chunk"):
        list(client_for(server).chat("Q", model="m", stream=True))


def test_connection_lost_mid_stream(server: FakeServer) -> None:
    def broken() -> Iterator[bytes]:
        yield sse(chat_chunk("partial"), done=False)
        raise httpx.ReadError("connection reset")

    server.on("POST", "/v1/chat/completions", httpx.Response(200, content=broken()))
    stream = client_for(server).chat("Q", model="m", stream=True)
    with pytest.raises(APIConnectionError, match="lost while streaming"):
        list(stream)
    assert stream.text == "partial"


def test_error_status_before_the_stream_starts(server: FakeServer) -> None:
    server.on(
        "POST", "/v1/chat/completions", httpx.Response(400, json=error_body("bad", "invalid_request_error"))
    )
    with pytest.raises(BadRequestError):
        client_for(server).chat("Q", model="m", stream=True)


def test_closing_early_releases_the_response(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", traced_chat_stream())
    stream = client_for(server).chat("Q", model="m", stream=True, trace=True)
    assert next(stream).text == "The"
    stream.close()
    assert stream.response.is_closed
    assert list(stream) == []


async def test_async_stream(server: FakeServer) -> None:
    server.on("POST", "/v1/chat/completions", traced_chat_stream())
    async with AsyncClient("http://alignd.test", transport=server.transport) as client:
        stream = await client.chat("Q", model="rec", stream=True, trace=True)
        assert isinstance(stream, AsyncStream)
        events = [e async for e in stream]
        assert [e.role for e in events] == ["base", "base", "aligner", "base", None]
        assert stream.text == "The sky is blue" and stream.finish_reason == "stop"
        assert stream.role_token_share == {"base": 0.75, "aligner": 0.25}

        server.on("POST", "/v1/completions", traced_chat_stream())
        async with await client.complete("Q", model="m", stream=True) as early:
            pass
        assert early.response.is_closed

        server.on("POST", "/v1/completions", sse_response(completion_chunk("x"), done=False))
        with pytest.raises(APIResponseError):
            await (await client.complete("Q", model="m", stream=True)).until_done()
