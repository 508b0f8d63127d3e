"""Client configuration: where the server is, how to authenticate, timeouts and the retry policy.

Precedence for every setting: the constructor argument, then the environment, then the default here.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "RetryPolicy",
    "TimeoutTypes",
    "resolve_api_key",
    "resolve_base_url",
    "resolve_timeout",
]

BASE_URL_ENV = "ALIGND_BASE_URL"
API_KEY_ENV = "ALIGND_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Aligned decoding on a CPU can take minutes for a long answer; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
# Statuses that mean "the server is full or not ready yet: try again later".
RETRY_STATUSES = frozenset({429, 503})

TimeoutTypes = float | httpx.Timeout | None


def resolve_base_url(base_url: str | None) -> str:
    """The server URL from the argument, ``ALIGND_BASE_URL`` or the default, without a trailing slash.

    A URL ending in ``/v1`` (as OpenAI clients are configured) is accepted and the suffix dropped.
    """
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
    return url.removesuffix("/v1")


def resolve_api_key(api_key: str | None) -> str | None:
    """The API key from the argument or ``ALIGND_API_KEY``; ``None`` when neither is set."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def resolve_timeout(timeout: TimeoutTypes) -> httpx.Timeout:
    """An ``httpx.Timeout`` from seconds (one number for every phase), a Timeout, or ``None`` (no limit)."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before retrying a request.

    A request is retried on 429 and 503 responses and on connection failures, at most ``max_retries``
    times. The wait before retry ``n`` (0-based) is ``min(max_delay, initial_delay * 2**n)`` scaled by a
    random factor in ``[1 - jitter, 1]``, unless the response carries ``Retry-After`` (seconds or an HTTP
    date; ``retry-after-ms`` also understood): that wait is used as given, and a wait longer than
    ``max_retry_after`` is not waited for at all (the error is raised instead).
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The computed wait in seconds before retry number ``attempt`` (0-based), jitter applied."""
        base = min(self.max_delay, self.initial_delay * (2.0**attempt))
        factor = 1.0 - self.jitter * (rng or random).random()
        return max(0.0, base * factor)

    def delay(
        self, attempt: int, headers: Mapping[str, str] | None = None, rng: random.Random | None = None
    ) -> float | None:
        """The wait before retry ``attempt``, or ``None`` when no retry should be made."""
        if attempt >= self.max_retries:
            return None
        retry_after = parse_retry_after(headers) if headers is not None else None
        if retry_after is None:
            return self.backoff(attempt, rng)
        if retry_after > self.max_retry_after:
            return None
        return retry_after


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date); None if absent."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
