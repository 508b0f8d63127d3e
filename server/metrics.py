"""Prometheus metrics of the gateway (``GET /metrics``), on a registry of the app's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

__all__ = ["Metrics"]


class _SessionRewinds:
    """Sessions each engine rewound in place (a count the engine keeps), read when /metrics is scraped."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "alignd_session_rewinds", "Decoder sessions rewound in place instead of restarted, by model.",
            labels=["model"],
        )
        for model, count in self.counts.items():
            family.add_metric([model], count)
        yield family


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
        self.decode_steps = Counter(
            "alignd_engine_decode_steps",
            "Forward steps decoders asked of each model: a view, a scored block or a reward batch is one, a "
            "written block one per token (compare with alignd_role_tokens, the tokens each role wrote).",
            ["model"], registry=self.registry,
        )
        self.in_flight = Gauge("alignd_requests_in_flight", "Requests being served.", registry=self.registry)
        self.engine_up = Gauge("alignd_engine_up", "1 when a hosted model's engine is ready.", ["model"],
                               registry=self.registry)
        self.session_rewinds = _SessionRewinds()
        self.registry.register(self.session_rewinds)

    def observe_tokens(self, prepared: Any, prompt_tokens: int, completion_tokens: int) -> None:
        """Count the tokens of one finished request."""
        target = getattr(prepared.target, "name", None) or prepared.target.model.name
        self.prompt_tokens.labels(target).inc(prompt_tokens)
        self.completion_tokens.labels(target).inc(completion_tokens)

    def render(self, engines_ready: dict[str, bool], session_rewinds: dict[str, int] | None = None) -> bytes:
        """The exposition text; ``session_rewinds`` are the engines' own counts."""
        for name, ready in engines_ready.items():
            self.engine_up.labels(name).set(1 if ready else 0)
        self.session_rewinds.counts = dict(session_rewinds or {})
        return generate_latest(self.registry)
