"""Retry policy arithmetic and settings resolution."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import format_datetime

import httpx
import pytest

from alignd.client import RetryPolicy
from alignd.client._config import parse_retry_after, resolve_base_url, resolve_timeout


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens() -> None:
    policy = RetryPolicy(max_retries=10, initial_delay=0.5, max_delay=4.0, jitter=0.25)
    rng = random.Random(0)
    for attempt, full in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        for _ in range(20):
            delay = policy.backoff(attempt, rng)
            assert 0.75 * full <= delay <= full
    exact = RetryPolicy(initial_delay=0.5, jitter=0.0)
    assert [exact.backoff(n) for n in range(3)] == [0.5, 1.0, 2.0]


def test_delay_stops_after_max_retries_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=2, jitter=0.0, max_retry_after=30)
    assert policy.delay(0) == 0.5
    assert policy.delay(2) is None
    assert policy.delay(0, {"retry-after": "3"}) == 3.0
    assert policy.delay(0, {"retry-after": "31"}) is None
    assert policy.delay(0, httpx.Headers({"Retry-After": "2"})) == 2.0  # case-insensitive headers


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "1200", "retry-after": "9"}) == 1.2
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 10, tz=timezone.utc), usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(10.0)


def test_base_url_and_timeout_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_base_url("http://h:1/v1/") == "http://h:1"
    assert resolve_base_url("http://h:1/api") == "http://h:1/api"
    monkeypatch.setenv("ALIGND_BASE_URL", "http://env:2")
    assert resolve_base_url(None) == "http://env:2"
    assert resolve_base_url("http://arg:3") == "http://arg:3"
    assert resolve_timeout(5).read == 5
    assert resolve_timeout(None).read is None
    t = httpx.Timeout(1.0, connect=2.0)
    assert resolve_timeout(t) is t
