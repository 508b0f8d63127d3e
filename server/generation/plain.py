"""Plain hosted models: vLLM's native decoding, no per-token loop in the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

from alignd.server.engines.base import SamplingSpec
from alignd.server.generation.events import ChoiceEvent
from alignd.server.models import HostedModel

__all__ = ["generate_plain"]


async def generate_plain(
    model: HostedModel, request_id: str, prompt_ids: list[int], spec: SamplingSpec
) -> AsyncIterator[ChoiceEvent]:
    """Stream the choices of one native generation as :class:`ChoiceEvent` deltas."""
    async for update in model.engine.generate(request_id, prompt_ids, spec):
        for c in update.choices:
            if not c.token_ids and not c.text and c.finish_reason is None:
                continue
            yield ChoiceEvent(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                prompt_logprobs=update.prompt_logprobs,
            )
