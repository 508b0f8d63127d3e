"""Grammar engines behind one small interface: :class:`GrammarBackend` compiles, :class:`Matcher` follows.

``xgrammar`` is the default; ``llguidance`` is optional. Choose by name with :func:`make_backend`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignd.decoders.contract import DecoderError
from alignd.decoders.grammar.backends.base import GrammarBackend, Matcher

if TYPE_CHECKING:
    from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "GrammarBackend", "Matcher", "make_backend"]

DEFAULT_BACKEND = "xgrammar"
BACKENDS = ("xgrammar", "llguidance")


def make_backend(name: str, vocab: GrammarVocab) -> GrammarBackend:
    """A new backend called ``name`` over ``vocab``; ``DecoderError`` naming the choices otherwise."""
    if name == "xgrammar":
        from alignd.decoders.grammar.backends.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(vocab)
    if name == "llguidance":
        from alignd.decoders.grammar.backends.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(vocab)
    raise DecoderError(f"unknown grammar backend {name!r}; available: {', '.join(BACKENDS)}", param="backend")
