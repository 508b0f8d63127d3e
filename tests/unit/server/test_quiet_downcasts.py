"""alignd's vLLM plugin drops vLLM's per-weight warning for a float32 checkpoint served in 16 bits (268 lines at
every start of the embedded default) and keeps its other dtype warnings."""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models import utils

from alignd.server.engines.vllm_plugin import register_quiet_downcasts

MESSAGE = "Attempted to load weight %s with dtype %s into parameter with dtype %s"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_downcast_warnings_are_dropped_and_other_mismatches_kept() -> None:
    register_quiet_downcasts()
    register_quiet_downcasts()  # idempotent
    logger = utils.logger  # the logger vLLM's weight loader warns through
    records = _Records()
    logger.addHandler(records)
    try:
        logger.warning(MESSAGE, "a.weight", torch.float32, torch.bfloat16)
        logger.warning(MESSAGE, "b.weight", torch.float32, torch.float16)
        logger.warning(MESSAGE, "c.weight", torch.float16, torch.bfloat16)
        logger.warning("something else about %s", "d.weight")
    finally:
        logger.removeHandler(records)
    assert [r.args[0] for r in records.records] == ["c.weight", "d.weight"]  # type: ignore[index]
