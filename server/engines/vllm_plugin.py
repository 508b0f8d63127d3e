"""alignd's vLLM plugin: the engine core computes the session steps a decoder sends together in one step.

vLLM loads it in every process it starts (entry point group ``vllm.general_plugins``); it changes nothing
unless a request carries :data:`STEP_GROUP_KEY` in ``SamplingParams.extra_args``.

Why: a decoder often advances several sessions of one model at once (contrastive's expert and amateur as
one model under two system prompts, ARGS's scoring roles). The gateway sends their new chunks one after
another; on a busy machine the first send takes a fraction of a millisecond, and an idle engine core starts
a step with the first chunk before the others arrive, so every token took two or three engine steps.
Measured on the embedded SmolLM2 (two sessions stepped together, 48 steps): 54-64 ms per step against
35-43 ms for one session. Each chunk of such a group names the group and its size; after taking what is
queued, the engine core waits for the group's missing chunks for at most :data:`WAIT_SECONDS` before it
steps.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

__all__ = ["STEP_GROUP_KEY", "WAIT_SECONDS", "await_groups", "register"]

STEP_GROUP_KEY = "alignd_step_group"  # extra_args value: [group id, number of chunks in the group]
WAIT_SECONDS = 0.003  # longest wait for a group's missing chunks (a lost chunk costs this once)


def await_groups(
    groups: dict[str, list[int]], inputs: queue.Queue[Any], handle: Callable[[Any], None],
    timeout: float = WAIT_SECONDS,
) -> None:
    """Take inputs from ``inputs`` (handing each to ``handle``, which counts group members in ``groups``:
    id -> [seen, size]) until every group is complete or ``timeout`` seconds passed; then forget the
    groups."""
    deadline = time.monotonic() + timeout
    while any(seen < size for seen, size in groups.values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            item = inputs.get(timeout=remaining)
        except queue.Empty:
            break
        handle(item)
    groups.clear()


def register() -> None:
    """Patch vLLM's engine core (idempotent); a vLLM without the expected internals is left alone."""
    try:
        from vllm.v1.engine.core import EngineCore, EngineCoreProc
    except ImportError:
        return
    if getattr(EngineCore, "_alignd_step_groups", False):
        return
    add_request = EngineCore.add_request
    process_input_queue = getattr(EngineCoreProc, "_process_input_queue", None)
    handle = getattr(EngineCoreProc, "_handle_client_request", None)
    if process_input_queue is None or handle is None:
        return

    def add_request_grouped(self: Any, request: Any, request_wave: int = 0) -> None:
        add_request(self, request, request_wave)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        group = extra.get(STEP_GROUP_KEY)
        if group:
            groups: dict[str, list[int]] = self.__dict__.setdefault("_alignd_groups", {})
            seen = groups.setdefault(str(group[0]), [0, int(group[1])])
            seen[0] += 1

    def process_input_queue_grouped(self: Any) -> None:
        process_input_queue(self)
        groups: dict[str, list[int]] | None = self.__dict__.get("_alignd_groups")
        if groups:
            await_groups(groups, self.input_queue, lambda item: self._handle_client_request(*item))

    EngineCore.add_request = add_request_grouped  # type: ignore[method-assign]
    EngineCoreProc._process_input_queue = process_input_queue_grouped  # type: ignore[method-assign]
    EngineCore._alignd_step_groups = True  # type: ignore[attr-defined]
