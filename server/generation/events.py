"""What the generation layer hands the API layer: per-choice deltas, whichever way they were produced."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignd.server.engines.base import TokenLogprob

__all__ = ["ChoiceEvent", "TraceSpan"]


@dataclass
class TraceSpan:
    """A piece of output with its provenance: the role that wrote it and why."""

    text: str
    token_ids: list[int]
    role: str
    reason: str

    def to_json(self) -> dict[str, object]:
        """The span as it appears in ``alignment_trace``."""
        return {"text": self.text, "token_ids": self.token_ids, "role": self.role, "reason": self.reason}


@dataclass
class ChoiceEvent:
    """New output of one choice: text, token ids, log-probabilities, provenance, and finish reason."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    spans: list[TraceSpan] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only, when asked (echo)
