"""Load generation with the official ``openai`` AsyncOpenAI client: timed requests, bounded concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

__all__ = ["Result", "chat", "client", "completion", "run_all", "tokenize"]


@dataclass
class Result:
    """One finished request: wall time, completion tokens, text, finish reason and alignment trace."""

    seconds: float
    tokens: int
    text: str = ""
    finish_reason: str | None = None
    trace: dict[str, Any] | None = None
    token_ids: list[int] = field(default_factory=list)


def client(api_url: str, timeout: float = 600) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client for a local server, without retries (errors must surface)."""
    return openai.AsyncOpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=timeout)


def _trace_ids(trace: dict[str, Any] | None) -> list[int]:
    if not trace:
        return []
    return [t for span in trace.get("spans", []) for t in span["token_ids"]]


async def chat(
    c: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]], max_tokens: int, *,
    trace: bool = False, extra: dict[str, Any] | None = None, **kwargs: Any,
) -> Result:
    """One greedy chat completion (unless ``temperature`` is given), timed."""
    body: dict[str, Any] = dict(extra or {})
    if trace:
        body.setdefault("alignment", {})["trace"] = True
    kwargs.setdefault("temperature", 0.0)
    t0 = time.perf_counter()
    out = await c.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, extra_body=body or None, **kwargs  # type: ignore[arg-type]
    )
    dt = time.perf_counter() - t0
    ch = out.choices[0]
    tr = (ch.model_extra or {}).get("alignment_trace")
    tokens = out.usage.completion_tokens if out.usage else 0
    return Result(dt, tokens, ch.message.content or "", ch.finish_reason, tr, _trace_ids(tr))


async def completion(
    c: openai.AsyncOpenAI, model: str, prompt: str | list[int], max_tokens: int, *,
    extra: dict[str, Any] | None = None, **kwargs: Any,
) -> Result:
    """One greedy completion (text or token-id prompt), timed."""
    kwargs.setdefault("temperature", 0.0)
    t0 = time.perf_counter()
    out = await c.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, extra_body=extra or None, **kwargs  # type: ignore[arg-type]
    )
    dt = time.perf_counter() - t0
    ch = out.choices[0]
    tokens = out.usage.completion_tokens if out.usage else 0
    return Result(dt, tokens, ch.text, ch.finish_reason, (ch.model_extra or {}).get("alignment_trace"))


async def run_all(jobs: Sequence[Callable[[], Awaitable[Any]]], concurrency: int) -> tuple[float, list[Any]]:
    """Run ``jobs`` with at most ``concurrency`` at once; returns the wall time and results in order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - t0, list(results)


async def tokenize(base_url: str, model: str, messages: list[dict[str, str]]) -> list[int]:
    """A model's prompt ids for chat ``messages`` (its chat template or prompt format), from the server."""
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(base_url + "/tokenize", json={"model": model, "messages": messages})
        r.raise_for_status()
        return list(r.json()["tokens"])


async def decode_steps(base_url: str) -> dict[str, float]:
    """``alignd_engine_decode_steps_total`` by model, from the server's /metrics: the forward steps decoders
    have asked of each model so far."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.get(base_url + "/metrics")
        r.raise_for_status()
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(r.text) if family.name == "alignd_engine_decode_steps"
        for sample in family.samples if sample.name.endswith("_total")
    }
