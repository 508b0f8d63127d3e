"""Prometheus metrics of the gateway (``GET /metrics``), on a registry of the app's own."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Request, token and engine-operation counters; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "alignd_requests", "Requests served, by endpoint, target and status.",
            ["endpoint", "target", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "alignd_request_seconds", "Time to the full response (streams: to the last chunk).",
            ["endpoint"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.prompt_tokens = Counter(
            "alignd_prompt_tokens", "Prompt tokens, by target.", ["target"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "alignd_completion_tokens", "Completion tokens, by target.", ["target"], registry=self.registry
        )
        self.role_tokens = Counter(
            "alignd_role_tokens", "Tokens written by each role of a recipe.", ["recipe", "role"],
            registry=self.registry,
        )
        self.engine_ops = Counter(
            "alignd_engine_operations", "Decoder engine operations, by model and kind.", ["model", "op"],
            registry=self.registry,
        )
        self.in_flight = Gauge("alignd_requests_in_flight", "Requests being served.", registry=self.registry)
        self.engine_up = Gauge("alignd_engine_up", "1 when a hosted model's engine is ready.", ["model"],
                               registry=self.registry)

    def observe_tokens(self, prepared: Any, prompt_tokens: int, completion_tokens: int) -> None:
        """Count the tokens of one finished request."""
        target = getattr(prepared.target, "name", None) or prepared.target.model.name
        self.prompt_tokens.labels(target).inc(prompt_tokens)
        self.completion_tokens.labels(target).inc(completion_tokens)

    def render(self, engines_ready: dict[str, bool]) -> bytes:
        """The exposition text."""
        for name, ready in engines_ready.items():
            self.engine_up.labels(name).set(1 if ready else 0)
        return generate_latest(self.registry)
