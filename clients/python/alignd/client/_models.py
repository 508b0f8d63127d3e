"""Typed results of the alignd API.

Every model keeps fields it does not know (``extra="allow"``), so a newer server never breaks an older SDK.
The OpenAI-shaped results (:class:`ChatCompletion`, :class:`Completion`) add shortcuts to their first
choice: ``.text``, ``.finish_reason``, ``.spans`` and ``.role_token_share``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AlignmentTrace",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "DecoderInfo",
    "DecoderRoleInfo",
    "Health",
    "ModelAlignment",
    "ModelInfo",
    "Span",
    "StreamEvent",
    "Usage",
    "compute_role_token_share",
]


class _APIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class Span(_APIModel):
    """A piece of output with its provenance: the role that wrote it and why."""

    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    role: str
    reason: str = ""


class AlignmentTrace(_APIModel):
    """The provenance of one choice: its spans in order and each role's share of the output tokens."""

    spans: list[Span] = Field(default_factory=list)
    role_token_share: dict[str, float] = Field(default_factory=dict)


class Usage(_APIModel):
    """Token counts of a request (completion tokens count the output once, whichever role wrote them)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatMessage(_APIModel):
    """A message the model wrote."""

    role: str = "assistant"
    content: str | None = None


class ChatChoice(_APIModel):
    """One choice of a chat completion."""

    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: str | None = None
    alignment_trace: AlignmentTrace | None = None

    @property
    def text(self) -> str:
        """The message content ("" when the model wrote nothing)."""
        return self.message.content or ""


class CompletionChoice(_APIModel):
    """One choice of a text completion."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    alignment_trace: AlignmentTrace | None = None


class _FirstChoiceShortcuts:
    """Shortcuts to the first choice, shared by chat and text completions."""

    choices: list[Any]

    def _first(self) -> Any:
        return self.choices[0] if self.choices else None

    @property
    def text(self) -> str:
        """The text of the first choice."""
        first = self._first()
        return first.text if first is not None else ""

    @property
    def finish_reason(self) -> str | None:
        """Why the first choice ended: ``stop`` or ``length``."""
        first = self._first()
        return first.finish_reason if first is not None else None

    @property
    def trace(self) -> AlignmentTrace | None:
        """The first choice's provenance, present when the request asked for ``trace``."""
        first = self._first()
        return first.alignment_trace if first is not None else None

    @property
    def spans(self) -> list[Span]:
        """The first choice's provenance spans (empty without ``trace``)."""
        trace = self.trace
        return trace.spans if trace is not None else []

    @property
    def role_token_share(self) -> dict[str, float]:
        """The share of the first choice's tokens each role wrote (empty without ``trace``)."""
        trace = self.trace
        if trace is None:
            return {}
        return trace.role_token_share or compute_role_token_share(trace.spans)


class ChatCompletion(_FirstChoiceShortcuts, _APIModel):
    """The result of ``chat(...)``, shaped like OpenAI's ``chat.completion``."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = Field(default_factory=list)
    usage: Usage | None = None


class Completion(_FirstChoiceShortcuts, _APIModel):
    """The result of ``complete(...)``, shaped like OpenAI's ``text_completion``."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None


class StreamEvent(_APIModel):
    """A piece of streamed output.

    With ``trace`` each event is one provenance span (``role`` and ``reason`` set); without it, one
    event per chunk with ``role`` and ``reason`` ``None``. The last event of a choice carries its
    ``finish_reason`` (and may have empty ``text``).
    """

    text: str = ""
    role: str | None = None
    reason: str | None = None
    token_ids: list[int] = Field(default_factory=list)
    index: int = 0
    finish_reason: str | None = None


class ModelAlignment(_APIModel):
    """What ``/v1/models`` says about an entry beyond OpenAI's fields.

    For a hosted model: ``task`` (generate or reward), ``engine``, ``ready``, and ``base_model`` (no chat
    template; ``None`` until the model has loaded). For a named recipe: ``decoder``, ``roles``,
    ``params`` and ``description``.
    """

    kind: str = "model"
    base_model: bool | None = None
    task: str | None = None
    engine: str | None = None
    ready: bool | None = None
    decoder: str | None = None
    roles: dict[str, str | dict[str, Any]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None

    def role_models(self) -> dict[str, str]:
        """Each role's model name (prompt variants reduced to their model)."""
        return {
            role: (spec if isinstance(spec, str) else str(spec.get("model", "")))
            for role, spec in self.roles.items()
        }


class ModelInfo(_APIModel):
    """An entry of ``/v1/models``: a hosted model or a named recipe."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    alignd: ModelAlignment = Field(default_factory=ModelAlignment)

    @property
    def kind(self) -> str:
        """``model`` for a hosted model, ``recipe`` for a named recipe."""
        return self.alignd.kind

    @property
    def is_recipe(self) -> bool:
        """Whether this entry is a named recipe."""
        return self.alignd.kind == "recipe"


class DecoderRoleInfo(_APIModel):
    """A role a decoder needs."""

    name: str
    description: str = ""
    task: str = "generate"
    optional: bool = False


class DecoderInfo(_APIModel):
    """An entry of ``/v1/alignment/decoders``: a decoder, its roles and its parameters' JSON schema."""

    name: str
    description: str = ""
    shared_vocab: bool = True
    roles: list[DecoderRoleInfo] = Field(default_factory=list)
    params_schema: dict[str, Any] = Field(default_factory=dict)

    def param_defaults(self) -> dict[str, Any]:
        """Each parameter's default value, ``None`` where the schema gives none."""
        props = self.params_schema.get("properties", {})
        return {name: spec.get("default") for name, spec in props.items() if isinstance(spec, dict)}


class Health(_APIModel):
    """The answer of ``/health``; ``status`` is ``ok`` when the server is ready."""

    status: str = "ok"


def compute_role_token_share(spans: Iterable[Span | StreamEvent]) -> dict[str, float]:
    """Each role's share of the tokens in ``spans`` (by characters where spans carry no token ids)."""
    counts: dict[str, int] = {}
    use_tokens = True
    spans = list(spans)
    if any(s.text and not s.token_ids for s in spans):
        use_tokens = False
    for span in spans:
        if span.role is None:
            continue
        n = len(span.token_ids) if use_tokens else len(span.text)
        counts[span.role] = counts.get(span.role, 0) + n
    total = sum(counts.values())
    return {role: n / total for role, n in counts.items()} if total else {}
