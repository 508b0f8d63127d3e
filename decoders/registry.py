"""Finding decoders by name: a built-in list, then the ``alignd.decoders`` entry-point group.

Clients choose decoders by name only; they never ship code. A third-party package registers a decoder with
``[project.entry-points."alignd.decoders"] mydecoder = "mypkg.module:MyDecoder"``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from alignd.decoders.contract import Decoder, DecoderError

__all__ = ["BUILTIN_DECODERS", "ENTRY_POINT_GROUP", "decoder_names", "describe_decoder", "get_decoder_class"]

ENTRY_POINT_GROUP = "alignd.decoders"

BUILTIN_DECODERS: dict[str, str] = {
    "nudging": "alignd.decoders.nudging:Nudging",
    "args": "alignd.decoders.args:ARGS",
    "contrastive": "alignd.decoders.contrastive:Contrastive",
    "logit_arithmetic": "alignd.decoders.logit_arithmetic:LogitArithmetic",
    "grammar": "alignd.decoders.grammar.decoder:GrammarAligned",
    "urial": "alignd.decoders.urial:URIAL",
}


def _load(target: str) -> type[Decoder]:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise TypeError(f"{target} is not an alignd Decoder subclass")
    return cls


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def decoder_names() -> list[str]:
    """Every decoder name that can be used in a recipe, built-ins first, that imports cleanly."""
    names = []
    for name in {**BUILTIN_DECODERS, **{k: v for k, v in _plugins().items() if k not in BUILTIN_DECODERS}}:
        try:
            get_decoder_class(name)
        except (ImportError, AttributeError):
            continue
        names.append(name)
    return names


def get_decoder_class(name: str) -> type[Decoder]:
    """The decoder class registered under ``name``; ``DecoderError`` naming the choices if unknown."""
    target = BUILTIN_DECODERS.get(name) or _plugins().get(name)
    if target is None:
        known = ", ".join(sorted({*BUILTIN_DECODERS, *_plugins()}))
        raise DecoderError(f"unknown decoder {name!r}; available: {known}", param="alignment.decoder")
    return _load(target)


def describe_decoder(cls: type[Decoder]) -> dict[str, Any]:
    """The public description of a decoder, as ``GET /v1/alignment/decoders`` lists it."""
    return {
        "name": cls.name,
        "description": cls.description,
        "shared_vocab": cls.shared_vocab,
        "roles": [
            {"name": r.name, "description": r.description, "task": r.task, "optional": r.optional}
            for r in cls.roles
        ],
        "params_schema": cls.params_model.model_json_schema(),
    }
