"""Streaming: server-sent events in, :class:`StreamEvent` objects with provenance out.

A stream is a sequence of ``data: {chunk}`` events ending with ``data: [DONE]``. Each chunk's choices
carry new text (``delta.content`` for chat, ``text`` for completions) and, when the request asked for a
trace, ``alignment_trace.spans`` covering that text. :class:`Stream` and :class:`AsyncStream` turn every
span into one event (``.text``, ``.role``, ``.reason``) and keep the running text, spans, finish reason
and usage for after the loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx

from alignd.client._exceptions import (
    AlignError,
    APIConnectionError,
    APIResponseError,
    APITimeoutError,
    status_error,
)
from alignd.client._models import Span, StreamEvent, Usage, compute_role_token_share

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncStream", "SSEDecoder", "ServerSentEvent", "Stream"]

StreamKind = Literal["chat", "completion"]
DONE = "[DONE]"


@dataclass(frozen=True)
class ServerSentEvent:
    """One server-sent event: its ``event`` name (``None`` for the default) and its ``data``."""

    data: str
    event: str | None = None


class SSEDecoder:
    """Incremental server-sent-events parser, fed one line (without its line ending) at a time."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None

    def decode(self, line: str) -> ServerSentEvent | None:
        """Feed a line; returns the event a blank line completes, else ``None``."""
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def flush(self) -> ServerSentEvent | None:
        """The pending event, if any (for a stream that ends without a final blank line)."""
        if not self._data:
            self._event = None
            return None
        event = ServerSentEvent("\n".join(self._data), self._event)
        self._data, self._event = [], None
        return event


@dataclass
class _ChoiceState:
    parts: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    finish_reason: str | None = None


class _StreamState:
    """What a stream has delivered so far; turns each chunk into events."""

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        self.choices: dict[int, _ChoiceState] = {}
        self.usage: Usage | None = None
        self.done = False

    def feed(self, sse: ServerSentEvent, response: httpx.Response | None) -> list[StreamEvent]:
        """The events in one server-sent event; raises the server's error if it sent one."""
        if sse.data.strip() == DONE:
            self.done = True
            return []
        try:
            chunk = json.loads(sse.data)
        except json.JSONDecodeError as exc:
            raise APIResponseError(f"unreadable stream chunk: {sse.data[:200]!r}", response=response) from exc
        if not isinstance(chunk, dict):
            raise APIResponseError(f"unexpected stream chunk: {sse.data[:200]!r}", response=response)
        if "error" in chunk or sse.event == "error":
            error = chunk.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise status_error(status, chunk, response)
        if chunk.get("usage"):
            self.usage = Usage.model_validate(chunk["usage"])
        events: list[StreamEvent] = []
        for choice in chunk.get("choices") or []:
            events.extend(self._choice_events(choice))
        return events

    def _choice_events(self, choice: dict[str, Any]) -> list[StreamEvent]:
        index = int(choice.get("index") or 0)
        state = self.choices.setdefault(index, _ChoiceState())
        if self.kind == "chat":
            text = (choice.get("delta") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        trace = choice.get("alignment_trace") or {}
        spans = [Span.model_validate(s) for s in trace.get("spans") or []]
        finish_reason = choice.get("finish_reason")

        events: list[StreamEvent] = []
        if spans and "".join(s.text for s in spans) == text:
            events = [
                StreamEvent(text=s.text, role=s.role, reason=s.reason, token_ids=s.token_ids, index=index)
                for s in spans
            ]
        elif spans:
            # Spans that do not add up to the chunk's text (a server holding back a partial character,
            # say): keep the text whole and attribute it only when one role wrote all of it.
            roles = {s.role for s in spans}
            role = roles.pop() if len(roles) == 1 else None
            events = [
                StreamEvent(
                    text=text,
                    role=role,
                    reason="; ".join(s.reason for s in spans if s.reason) if role else None,
                    token_ids=[t for s in spans for t in s.token_ids],
                    index=index,
                )
            ]
        elif text:
            events = [StreamEvent(text=text, index=index)]
        state.parts.append(text)
        state.spans.extend(spans)
        if finish_reason:
            state.finish_reason = finish_reason
            if events:
                events[-1] = events[-1].model_copy(update={"finish_reason": finish_reason})
            else:
                events = [StreamEvent(text="", index=index, finish_reason=finish_reason)]
        return events

    def check_complete(self, response: httpx.Response | None) -> None:
        """Raise if the stream ended early: no ``[DONE]`` and no choice finished."""
        finished = any(c.finish_reason for c in self.choices.values())
        if not self.done and not finished:
            raise APIResponseError(
                "the stream ended before the server finished the answer", response=response
            )


def _transport_error(exc: httpx.TransportError, url: str) -> AlignError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out while streaming from {url}", base_url=url, request=exc.request)
    return APIConnectionError(f"connection to {url} lost while streaming: {exc}", base_url=url)


class _StreamResults:
    """The running results of a stream, for after (or during) iteration; about choice 0 by default."""

    _state: _StreamState

    @property
    def text(self) -> str:
        """The text received so far for choice 0."""
        return self.text_of(0)

    def text_of(self, index: int) -> str:
        """The text received so far for choice ``index``."""
        state = self._state.choices.get(index)
        return "".join(state.parts) if state else ""

    @property
    def finish_reason(self) -> str | None:
        """Why choice 0 ended (``None`` until it has)."""
        state = self._state.choices.get(0)
        return state.finish_reason if state else None

    @property
    def spans(self) -> list[Span]:
        """The provenance spans received so far for choice 0 (empty without ``trace``)."""
        state = self._state.choices.get(0)
        return list(state.spans) if state else []

    @property
    def role_token_share(self) -> dict[str, float]:
        """Each role's share of choice 0's tokens so far, from the spans (empty without ``trace``)."""
        return compute_role_token_share(self.spans)

    @property
    def usage(self) -> Usage | None:
        """Token counts, when the server sent them (``stream_options={"include_usage": True}``)."""
        return self._state.usage


class Stream(_StreamResults):
    """A streaming response: iterate for :class:`StreamEvent` objects; closes itself when exhausted.

    Use it as a context manager (or call :meth:`close`) to stop early and release the connection.
    """

    def __init__(self, response: httpx.Response, kind: StreamKind) -> None:
        self.response = response
        self._state = _StreamState(kind)
        self._iterator = self._events()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._iterator

    def __next__(self) -> StreamEvent:
        return next(self._iterator)

    def _events(self) -> Generator[StreamEvent, None, None]:
        decoder = SSEDecoder()
        url = str(self.response.request.url)
        try:
            for line in self.response.iter_lines():
                sse = decoder.decode(line)
                if sse is not None:
                    yield from self._state.feed(sse, self.response)
                    if self._state.done:
                        return
            sse = decoder.flush()
            if sse is not None:
                yield from self._state.feed(sse, self.response)
            self._state.check_complete(self.response)
        except httpx.TransportError as exc:
            raise _transport_error(exc, url) from exc
        finally:
            self.response.close()

    def until_done(self) -> Stream:
        """Consume the rest of the stream (the results stay on the object); returns ``self``."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        """Stop reading and release the connection."""
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(_StreamResults):
    """The asynchronous twin of :class:`Stream`: ``async for event in stream``."""

    def __init__(self, response: httpx.Response, kind: StreamKind) -> None:
        self.response = response
        self._state = _StreamState(kind)
        self._iterator = self._events()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._iterator

    async def __anext__(self) -> StreamEvent:
        return await self._iterator.__anext__()

    async def _events(self) -> AsyncGenerator[StreamEvent, None]:
        decoder = SSEDecoder()
        url = str(self.response.request.url)
        try:
            async for line in self.response.aiter_lines():
                sse = decoder.decode(line)
                if sse is not None:
                    for event in self._state.feed(sse, self.response):
                        yield event
                    if self._state.done:
                        return
            sse = decoder.flush()
            if sse is not None:
                for event in self._state.feed(sse, self.response):
                    yield event
            self._state.check_complete(self.response)
        except httpx.TransportError as exc:
            raise _transport_error(exc, url) from exc
        finally:
            await self.response.aclose()

    async def until_done(self) -> AsyncStream:
        """Consume the rest of the stream (the results stay on the object); returns ``self``."""
        async for _ in self:
            pass
        return self

    async def close(self) -> None:
        """Stop reading and release the connection."""
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
