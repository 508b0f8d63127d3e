"""Prompt formats for models without a chat template: pure functions from OpenAI-style messages to text.

``messages`` is a list of ``{"role": "system" | "developer" | "user" | "assistant", "content": ...}``
(content a string or a list of ``{"type": "text", "text": ...}`` parts). Formats:

``plain``
    A documented plain layout for base models. System (and developer) messages, joined by newlines, come
    first followed by a blank line; then each user turn is ``Question: <text>`` on its own line and each
    assistant turn ``Answer: <text>``, turns separated by a blank line; a conversation ending on a user turn
    ends with ``Answer:`` (no trailing space) for the model to continue. Exactly::

        <system>\\n\\nQuestion: <user 1>\\nAnswer: <assistant 1>\\n\\nQuestion: <user 2>\\nAnswer:

    A conversation ending on an assistant turn ends with that turn's text (the model continues it). A base
    model tends to go on with a new ``Question:`` line: :func:`format_stop_strings` gives ``"\\nQuestion:"``.

``urial``
    URIAL (Lin et al., "The Unlocking Spell on Base LLMs"): a header describing the layout, the system
    text (the request's system messages, or a default), three constant stylistic examples, the earlier
    turns, then the query; the model writes the answer inside a code fence. The header, the default system
    text and the examples are data (``data/urial/urial.json``), not code. Layout::

        # Instruction\\n\\n<header lines>\\n<system>\\n\\n
        # Query:\\n```\\n<query>\\n```\\n\\n# Answer:\\n```\\n<answer>\\n```\\n\\n   (each example, each turn)
        # Query:\\n```\\n<user>\\n```\\n\\n# Answer:\\n```\\n

    (the reference code puts the query on the fence lines themselves; alignd gives the fences their own
    lines, as its examples do). Stop strings: a new ``# Query`` header.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from alignd.decoders.contract import DecoderError

__all__ = ["UrialData", "build_prompt", "format_stop_strings", "prompt_format_names", "urial_data"]

FENCE = "```"


@dataclass(frozen=True)
class UrialData:
    """The constant parts of a URIAL prompt."""

    header: str
    default_system: str
    examples: tuple[tuple[str, str], ...]


@lru_cache(maxsize=1)
def urial_data() -> UrialData:
    """Load the URIAL header, default system text and examples shipped in ``data/urial/urial.json``."""
    raw = json.loads(resources.files("alignd.decoders").joinpath("data/urial/urial.json").read_text("utf-8"))
    examples = tuple((str(e["query"]), str(e["answer"])) for e in raw["examples"])
    return UrialData(str(raw["header"]), str(raw["default_system"]), examples)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise DecoderError("only text content parts are supported", param="messages")
        return "".join(parts)
    raise DecoderError("message content must be a string or a list of text parts", param="messages")


def _split(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
    """System text and the (role, text) turns, roles checked."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        text = _text(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append((str(role), text))
        else:
            raise DecoderError(f"unsupported message role {role!r}", param=f"messages.{i}.role")
    if not turns:
        raise DecoderError("messages need at least one user or assistant message", param="messages")
    return "\n".join(system), turns


def _pairs(turns: list[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
    """(question, answer) pairs in order; ``None`` where a turn has no partner."""
    pairs: list[tuple[str | None, str | None]] = []
    i = 0
    while i < len(turns):
        role, text = turns[i]
        if role == "user" and i + 1 < len(turns) and turns[i + 1][0] == "assistant":
            pairs.append((text, turns[i + 1][1]))
            i += 2
        elif role == "user":
            pairs.append((text, None))
            i += 1
        else:
            pairs.append((None, text))
            i += 1
    return pairs


def _plain(messages: Sequence[Mapping[str, Any]]) -> str:
    system, turns = _split(messages)
    segments = []
    for question, answer in _pairs(turns):
        segment = "" if question is None else f"Question: {question}\n"
        segment += "Answer:" if answer is None else f"Answer: {answer}"
        segments.append(segment)
    return (system + "\n\n" if system else "") + "\n\n".join(segments)


def _urial_block(query: str, answer: str | None, closed: bool = True) -> str:
    block = f"# Query:\n{FENCE}\n{query}\n{FENCE}\n\n# Answer:\n{FENCE}\n"
    if answer is not None:
        block += answer
        if closed:
            block += f"\n{FENCE}\n\n"
    return block


def _urial(messages: Sequence[Mapping[str, Any]]) -> str:
    data = urial_data()
    system, turns = _split(messages)
    out = f"{data.header}\n{system or data.default_system}\n\n"
    for query, answer in data.examples:
        out += _urial_block(query, answer)
    pairs = _pairs(turns)
    for i, (question, reply) in enumerate(pairs):
        out += _urial_block(question or "", reply, closed=i < len(pairs) - 1)
    return out


_FORMATS: dict[str, Callable[[Sequence[Mapping[str, Any]]], str]] = {"plain": _plain, "urial": _urial}
_STOPS: dict[str, tuple[str, ...]] = {"plain": ("\nQuestion:",), "urial": ("# Query",)}


def prompt_format_names() -> list[str]:
    """The names :func:`build_prompt` accepts."""
    return list(_FORMATS)


def build_prompt(format: str, messages: list[dict]) -> str:
    """The prompt text of ``messages`` in prompt format ``format`` (``DecoderError`` if unknown)."""
    fn = _FORMATS.get(format)
    if fn is None:
        raise DecoderError(
            f"unknown prompt format {format!r}; available: {', '.join(_FORMATS)}", param="prompt_format"
        )
    return fn(messages)


def format_stop_strings(format: str) -> tuple[str, ...]:
    """Stop strings that end an answer written in ``format`` (a new question or query header)."""
    if format not in _FORMATS:
        raise DecoderError(f"unknown prompt format {format!r}", param="prompt_format")
    return _STOPS[format]
