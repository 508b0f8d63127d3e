"""Exceptions raised by the alignd SDK.

The hierarchy::

    * AlignError                    anything the SDK raises on purpose
      + APIConnectionError          the server could not be reached (refused, reset, DNS, ...)
        - APITimeoutError           the request took longer than the client's timeout
      + APIResponseError            the server answered 2xx with a body the SDK cannot read
      + APIStatusError              the server answered with an error status and an OpenAI error body
        - BadRequestError           400  a bad parameter, recipe or prompt
        - AuthenticationError       401  missing or wrong API key
        - NotFoundError             404  unknown model, recipe or route
        - PayloadTooLargeError      413  request body too large
        - RateLimitError            429  server full; retried by the client first
        - ServiceUnavailableError   503  server starting or overloaded; retried by the client first

``APIStatusError`` itself is raised for any other error status (and for an error sent inside a stream).
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AlignError",
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServiceUnavailableError",
]


class AlignError(Exception):
    """Base class of every exception the SDK raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(AlignError):
    """The server could not be reached at ``base_url``."""

    def __init__(self, message: str, *, base_url: str, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.base_url = base_url
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request did not complete within the client's timeout."""


class APIResponseError(AlignError):
    """A successful response whose body is not what the alignd API promises."""

    def __init__(self, message: str, *, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


class APIStatusError(AlignError):
    """The server answered with an error status.

    The fields come from the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``;
    ``body`` holds the whole parsed body (or the raw text when it was not JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: Any = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.response = response

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status_code}: {self.message}{where}"


class BadRequestError(APIStatusError):
    """400: a bad parameter, recipe or prompt; ``param`` names the offending field when known."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong (set ``api_key`` or ``ALIGND_API_KEY``)."""


class NotFoundError(APIStatusError):
    """404: the model, recipe or route does not exist on this server."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is larger than the server accepts."""


class RateLimitError(APIStatusError):
    """429: the server has too many requests in flight; raised after the client's retries ran out."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is starting, draining or overloaded; raised after the client's retries ran out."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error(status_code: int, body: Any, response: httpx.Response | None = None) -> APIStatusError:
    """The exception for an error ``status_code`` with an (ideally OpenAI-shaped) parsed ``body``."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        etype, param, code = error.get("type"), error.get("param"), error.get("code")
    else:
        message = body if isinstance(body, str) else (str(error) if error else "")
        etype = param = code = None
    if not message:
        message = httpx.codes.get_reason_phrase(status_code) or f"HTTP {status_code}"
    cls = _BY_STATUS.get(status_code, APIStatusError)
    return cls(
        message,
        status_code=status_code,
        type=etype if isinstance(etype, str) else None,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, (str, int)) else None,
        body=body,
        response=response,
    )
