"""What a grammar is: :class:`GrammarSpec`, built from a recipe's params or an OpenAI ``response_format``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from alignd.decoders.contract import DecoderError

__all__ = ["GrammarKind", "GrammarMode", "GrammarSpec"]

GrammarKind = Literal["json_schema", "regex", "ebnf", "json_object", "choice"]
GrammarMode = Literal["constrained", "asap"]


class GrammarSpec(BaseModel):
    """A grammar one choice must match, and how to sample under it.

    ``kind`` says how to read ``value``: ``json_schema`` (a schema object, or its JSON text), ``regex``
    (a regular expression the whole output must match), ``ebnf`` (an xgrammar/GBNF grammar with a ``root``
    rule), ``json_object`` (any JSON object; ``value`` unused) or ``choice`` (one of a list of strings).
    ``mode`` is ``constrained`` (mask disallowed tokens, renormalise) or ``asap`` (adaptive sampling with
    approximate expected futures: repeated samples converge to the model's distribution conditioned on the
    grammar).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GrammarKind
    value: str | dict[str, Any] | list[str] | None = None
    mode: GrammarMode = "constrained"

    @model_validator(mode="after")
    def _check_value(self) -> GrammarSpec:
        v = self.value
        if self.kind == "json_object":
            if v not in (None, "", {}):
                raise ValueError("json_object takes no value")
        elif self.kind == "json_schema":
            if isinstance(v, str):
                try:
                    parsed = json.loads(v)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"json_schema value is not valid JSON: {exc}") from exc
                if not isinstance(parsed, dict):
                    raise ValueError("json_schema value must be a JSON object")  # noqa: TRY004 (pydantic)
            elif not isinstance(v, dict):
                raise ValueError("json_schema value must be a schema object or its JSON text")
        elif self.kind in ("regex", "ebnf"):
            if not isinstance(v, str) or not v:
                raise ValueError(f"{self.kind} value must be a non-empty string")
        elif self.kind == "choice" and (
            not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v)
        ):
            raise ValueError("choice value must be a non-empty list of non-empty strings")
        return self

    def schema_object(self) -> dict[str, Any]:
        """The JSON schema as a dict (``json_schema`` only)."""
        if isinstance(self.value, dict):
            return self.value
        assert isinstance(self.value, str)
        return json.loads(self.value)

    def cache_key(self) -> str:
        """A canonical text for the grammar alone (the mode does not change what is compiled)."""
        value: Any = self.value
        if self.kind == "json_schema":
            value = self.schema_object()
        return json.dumps([self.kind, value], sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_response_format(
        cls, response_format: Mapping[str, Any] | None, mode: GrammarMode = "constrained"
    ) -> GrammarSpec | None:
        """The grammar an OpenAI ``response_format`` asks for, or ``None`` for ``{"type": "text"}``.

        Accepts ``{"type": "json_object"}`` and ``{"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}, "strict": ...}}``; anything else is a :class:`DecoderError` naming
        ``response_format``.
        """
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return cls(kind="json_object", mode=mode)
        if kind == "json_schema":
            block = response_format.get("json_schema")
            schema = block.get("schema") if isinstance(block, Mapping) else None
            if not isinstance(schema, Mapping):
                raise DecoderError(
                    "response_format.json_schema.schema must be a JSON schema object",
                    param="response_format.json_schema.schema",
                )
            return cls(kind="json_schema", value=dict(schema), mode=mode)
        raise DecoderError(f"unsupported response_format type {kind!r}", param="response_format.type")
