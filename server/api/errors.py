"""alignd's API errors and the one function that turns any of them into the OpenAI error body.

Exception tree::

    APIError                      (status, type, code, param)
    ├── BadRequest                400 invalid_request_error
    │   └── ContextLengthExceeded 400 code=context_length_exceeded
    ├── Unauthorized              401 authentication_error
    ├── NotFound                  404 code=model_not_found
    ├── PayloadTooLarge           413
    ├── TooManyRequests           429
    └── ServiceUnavailable        503
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "APIError",
    "BadRequest",
    "ContextLengthExceeded",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "error_body",
    "install_error_handlers",
]


class APIError(Exception):
    """An error a client sees, with the OpenAI error fields."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequest(APIError):
    """A parameter the server cannot accept (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """The prompt, or prompt plus completion, does not fit the model's context (400)."""

    code = "context_length_exceeded"


class Unauthorized(APIError):
    """No valid API key (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    """An unknown model or recipe (404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(APIError):
    """A request body over the configured limit (413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class TooManyRequests(APIError):
    """The server is at its concurrency limit (429)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    """An engine is loading, dead or unreachable (503)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _response(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


def install_error_handlers(app: Any) -> None:
    """Make every error the app can raise leave as an OpenAI error body with the right status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _response(BadRequest(f"malformed JSON body: {first.get('msg')}", None, "invalid_json"))
        param = _validation_param(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value"))
        return _response(BadRequest(f"{param}: {msg}" if param else msg, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), type_, None, code), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("alignd.server").exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)
