"""``Client`` and ``AsyncClient``: the alignd API over httpx.

Both twins share request building, retries and error mapping (:class:`_BaseClient`); they differ only in
how they send. Tests and users can swap the network for ``httpx.MockTransport`` through ``transport=``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, overload

import httpx

from alignd.client._config import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    RETRY_STATUSES,
    RetryPolicy,
    TimeoutTypes,
    resolve_api_key,
    resolve_base_url,
    resolve_timeout,
)
from alignd.client._exceptions import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    status_error,
)
from alignd.client._models import ChatCompletion, Completion, DecoderInfo, Health, ModelInfo
from alignd.client._recipes import BaseRecipe
from alignd.client._streaming import AsyncStream, Stream
from alignd.client._version import __version__

if TYPE_CHECKING:
    from typing_extensions import Self
from pydantic import BaseModel, ValidationError

__all__ = ["AsyncClient", "Client", "Messages", "RecipeLike"]

Messages = str | Sequence[Mapping[str, Any]]
"""A prompt for ``chat``: a user message as a string, or OpenAI-style ``{"role", "content"}`` messages."""

RecipeLike: TypeAlias = str | BaseRecipe | Mapping[str, Any]
"""A recipe: a named recipe on the server, a builder such as ``Nudging(...)``, or an ``alignment`` dict."""

_M = TypeVar("_M", bound=BaseModel)

# Indirections so tests can skip the waiting.
_sleep = time.sleep
_async_sleep = asyncio.sleep


def _chat_messages(messages: Messages, system: str | None) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        out: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        out = [dict(m) for m in messages]
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return out


def _first_role_model(alignment: Mapping[str, Any]) -> str | None:
    roles = alignment.get("roles") or {}
    first = next(iter(roles.values()), None)
    if isinstance(first, Mapping):
        return str(first.get("model")) if first.get("model") else None
    return first if isinstance(first, str) else None


def _request_body(
    model: str | None,
    recipe: RecipeLike | None,
    stream: bool,
    trace: bool,
    recipe_params: Mapping[str, Any] | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The JSON body shared by chat and text completions (prompt fields added by the caller)."""
    alignment: dict[str, Any] | None = None
    if isinstance(recipe, str):
        if model is not None and model != recipe:
            raise ValueError("give either model= or a named recipe=, not both")
        model = recipe
    elif isinstance(recipe, BaseRecipe):
        alignment = recipe.to_alignment()
        model = model or recipe.default_model()
    elif isinstance(recipe, Mapping):
        alignment = dict(recipe)
        model = model or _first_role_model(recipe)
    elif recipe is not None:
        raise TypeError(f"recipe must be a name, a recipe object or a dict, not {type(recipe).__name__}")
    if model is None:
        raise ValueError("give model= (a hosted model or a named recipe) or recipe= (with at least one role)")
    if recipe_params:
        alignment = alignment or {}
        alignment["params"] = {**(alignment.get("params") or {}), **recipe_params}
    if trace:
        alignment = {**(alignment or {}), "trace": True}
    extra_body = params.pop("extra_body", None) or {}
    body: dict[str, Any] = {"model": model}
    body.update({k: v for k, v in params.items() if v is not None})
    body["stream"] = stream
    if alignment is not None:
        body["alignment"] = alignment
    body.update(extra_body)
    return body


def _parse(response: httpx.Response, model: type[_M]) -> _M:
    try:
        return model.model_validate(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise APIResponseError(
            f"unexpected response from {response.request.url}: {exc}", response=response
        ) from exc


def _parse_list(response: httpx.Response, model: type[_M]) -> list[_M]:
    try:
        body = response.json()
        items = body.get("data", []) if isinstance(body, dict) else body
        return [model.model_validate(item) for item in items]
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError, AttributeError, TypeError) as exc:
        raise APIResponseError(
            f"unexpected response from {response.request.url}: {exc}", response=response
        ) from exc


def _error_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


class _BaseClient:
    """Configuration, request building and error mapping shared by the sync and async clients."""

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: TimeoutTypes,
        max_retries: int,
        retry: RetryPolicy | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = resolve_timeout(timeout)
        self.retry = retry if retry is not None else RetryPolicy(max_retries=max_retries)
        self.headers: dict[str, str] = {"user-agent": f"alignd-client/{__version__}", **(headers or {})}
        if self.api_key:
            self.headers["authorization"] = f"Bearer {self.api_key}"

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _connect_error(self, exc: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
        if isinstance(exc, httpx.ConnectTimeout):
            return APITimeoutError(
                f"timed out connecting to the alignd server at {self.base_url}",
                base_url=self.base_url,
                request=request,
            )
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(
                f"the alignd server at {self.base_url} did not answer within the timeout ({exc})",
                base_url=self.base_url,
                request=request,
            )
        if isinstance(exc, httpx.ConnectError):
            return APIConnectionError(
                f"the alignd server is not running at {self.base_url} (cannot connect: {exc})",
                base_url=self.base_url,
                request=request,
            )
        return APIConnectionError(
            f"connection to the alignd server at {self.base_url} failed: {exc}",
            base_url=self.base_url,
            request=request,
        )

    def _retry_delay(self, attempt: int, retries: bool, response: httpx.Response | None) -> float | None:
        """The wait before another try, or ``None`` to give up (the caller raises)."""
        if not retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        return self.retry.delay(attempt, response.headers if response is not None else None)

    @staticmethod
    def _status_error(response: httpx.Response) -> APIStatusError:
        return status_error(response.status_code, _error_body(response), response)

    @staticmethod
    def _chat_body(
        messages: Messages,
        model: str | None,
        recipe: RecipeLike | None,
        stream: bool,
        trace: bool,
        recipe_params: Mapping[str, Any] | None,
        system: str | None,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        body = _request_body(model, recipe, stream, trace, recipe_params, params)
        body["messages"] = _chat_messages(messages, system)
        return body

    @staticmethod
    def _completion_body(
        prompt: str | Sequence[str],
        model: str | None,
        recipe: RecipeLike | None,
        stream: bool,
        trace: bool,
        recipe_params: Mapping[str, Any] | None,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        body = _request_body(model, recipe, stream, trace, recipe_params, params)
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        return body


class Client(_BaseClient):
    """A synchronous alignd client.

    >>> client = Client()                     # ALIGND_BASE_URL or http://127.0.0.1:8000
    >>> client.chat("Hello", recipe=Nudging(base="tiny-base", aligner="tiny-chat")).text

    ``timeout`` is seconds (or an ``httpx.Timeout``); ``max_retries`` bounds the retries on 429, 503 and
    connection failures (``retry=RetryPolicy(...)`` sets the backoff too). ``transport`` replaces the
    network (``httpx.MockTransport`` in tests); ``http_client`` supplies a whole ``httpx.Client``, which
    the alignd client then does not close.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            retry=retry,
            headers=headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout, transport=transport)

    def _send(
        self, method: str, path: str, *, body: Any = None, stream: bool = False, retries: bool = True
    ) -> httpx.Response:
        request = self._http.build_request(
            method, self._url(path), json=body, headers=self.headers, timeout=self.timeout
        )
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                delay = self._retry_delay(attempt, retries, None)
                if delay is None:
                    raise self._connect_error(exc, request) from exc
            except httpx.TransportError as exc:
                raise self._connect_error(exc, request) from exc
            else:
                if response.is_success:
                    return response
                delay = self._retry_delay(attempt, retries, response)
                if delay is None:
                    try:
                        response.read()
                    finally:
                        response.close()
                    raise self._status_error(response)
                response.close()
            _sleep(delay)
            attempt += 1

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[False] = ...,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[True],
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> Stream: ...

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: bool,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> ChatCompletion | Stream: ...

    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        recipe: RecipeLike | None = None,
        stream: bool = False,
        trace: bool = False,
        recipe_params: Mapping[str, Any] | None = None,
        system: str | None = None,
        **params: Any,
    ) -> ChatCompletion | Stream:
        """Chat completion with a hosted model, a named recipe or a recipe object.

        ``messages`` is a user message string or OpenAI-style messages; ``system`` prepends a system
        message. ``trace=True`` asks for provenance spans. ``recipe_params`` overrides decoder parameters
        (of a named recipe, or on top of a recipe object's). Other keyword arguments are OpenAI parameters
        (``max_tokens``, ``temperature``, ``seed``, ``stop``, ...) sent as given (``None`` values are
        dropped); ``extra_body`` is merged into the JSON body last. With ``stream=True`` returns a
        :class:`Stream` of events instead of a :class:`ChatCompletion`.
        """
        body = self._chat_body(messages, model, recipe, stream, trace, recipe_params, system, params)
        response = self._send("POST", "/v1/chat/completions", body=body, stream=stream)
        if stream:
            return Stream(response, "chat")
        return _parse(response, ChatCompletion)

    @overload
    def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[False] = ...,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> Completion: ...

    @overload
    def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[True],
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> Stream: ...

    @overload
    def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: bool,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> Completion | Stream: ...

    def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = None,
        recipe: RecipeLike | None = None,
        stream: bool = False,
        trace: bool = False,
        recipe_params: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Completion | Stream:
        """Text completion of ``prompt``; arguments as for :meth:`chat`."""
        body = self._completion_body(prompt, model, recipe, stream, trace, recipe_params, params)
        response = self._send("POST", "/v1/completions", body=body, stream=stream)
        if stream:
            return Stream(response, "completion")
        return _parse(response, Completion)

    def models(self) -> list[ModelInfo]:
        """The hosted models and named recipes (``/v1/models``)."""
        return _parse_list(self._send("GET", "/v1/models"), ModelInfo)

    def decoders(self) -> list[DecoderInfo]:
        """The decoders the server offers, with their roles and parameter schemas."""
        return _parse_list(self._send("GET", "/v1/alignment/decoders"), DecoderInfo)

    def health(self) -> Health:
        """The server's health; raises (without retrying) when it is down or not ready."""
        response = self._send("GET", "/health", retries=False)
        try:
            return Health.model_validate(response.json())
        except (json.JSONDecodeError, ValidationError):
            return Health()

    def close(self) -> None:
        """Close the connection pool (not an ``http_client`` passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """The asynchronous twin of :class:`Client`: same arguments, ``await`` every call.

    >>> async with AsyncClient() as client:
    ...     stream = await client.chat("Hi", model="tiny-chat", stream=True)
    ...     async for event in stream:
    ...         print(event.text, end="")
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            retry=retry,
            headers=headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout, transport=transport)

    async def _send(
        self, method: str, path: str, *, body: Any = None, stream: bool = False, retries: bool = True
    ) -> httpx.Response:
        request = self._http.build_request(
            method, self._url(path), json=body, headers=self.headers, timeout=self.timeout
        )
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                delay = self._retry_delay(attempt, retries, None)
                if delay is None:
                    raise self._connect_error(exc, request) from exc
            except httpx.TransportError as exc:
                raise self._connect_error(exc, request) from exc
            else:
                if response.is_success:
                    return response
                delay = self._retry_delay(attempt, retries, response)
                if delay is None:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                    raise self._status_error(response)
                await response.aclose()
            await _async_sleep(delay)
            attempt += 1

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[False] = ...,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> ChatCompletion: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[True],
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> AsyncStream: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: bool,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        system: str | None = ...,
        **params: Any,
    ) -> ChatCompletion | AsyncStream: ...

    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        recipe: RecipeLike | None = None,
        stream: bool = False,
        trace: bool = False,
        recipe_params: Mapping[str, Any] | None = None,
        system: str | None = None,
        **params: Any,
    ) -> ChatCompletion | AsyncStream:
        """Chat completion; see :meth:`Client.chat`. With ``stream=True`` returns an :class:`AsyncStream`."""
        body = self._chat_body(messages, model, recipe, stream, trace, recipe_params, system, params)
        response = await self._send("POST", "/v1/chat/completions", body=body, stream=stream)
        if stream:
            return AsyncStream(response, "chat")
        return _parse(response, ChatCompletion)

    @overload
    async def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[False] = ...,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> Completion: ...

    @overload
    async def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: Literal[True],
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> AsyncStream: ...

    @overload
    async def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = ...,
        recipe: RecipeLike | None = ...,
        stream: bool,
        trace: bool = ...,
        recipe_params: Mapping[str, Any] | None = ...,
        **params: Any,
    ) -> Completion | AsyncStream: ...

    async def complete(
        self,
        prompt: str | Sequence[str],
        *,
        model: str | None = None,
        recipe: RecipeLike | None = None,
        stream: bool = False,
        trace: bool = False,
        recipe_params: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Completion | AsyncStream:
        """Text completion; see :meth:`Client.complete`."""
        body = self._completion_body(prompt, model, recipe, stream, trace, recipe_params, params)
        response = await self._send("POST", "/v1/completions", body=body, stream=stream)
        if stream:
            return AsyncStream(response, "completion")
        return _parse(response, Completion)

    async def models(self) -> list[ModelInfo]:
        """The hosted models and named recipes (``/v1/models``)."""
        return _parse_list(await self._send("GET", "/v1/models"), ModelInfo)

    async def decoders(self) -> list[DecoderInfo]:
        """The decoders the server offers, with their roles and parameter schemas."""
        return _parse_list(await self._send("GET", "/v1/alignment/decoders"), DecoderInfo)

    async def health(self) -> Health:
        """The server's health; raises (without retrying) when it is down or not ready."""
        response = await self._send("GET", "/health", retries=False)
        try:
            return Health.model_validate(response.json())
        except (json.JSONDecodeError, ValidationError):
            return Health()

    async def aclose(self) -> None:
        """Close the connection pool (not an ``http_client`` passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
