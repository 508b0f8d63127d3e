"""Grammar-aligned decoding: grammar constraints (xgrammar, llguidance) and ASAp.

The server builds a :class:`GrammarVocab` once per hosted model, a :class:`GrammarSpec` from a request's
``response_format`` or a recipe's params, and one constraint per choice with :func:`build_grammar`; it sets
the constraint as ``DecoderContext.grammar`` so any token-level decoder honours it. The ``grammar`` decoder
(:class:`alignd.decoders.grammar.decoder.GrammarAligned`) runs one model under a grammar on its own.
"""

from alignd.decoders.grammar.asap import AsapConstraint, AsapTrie, TrieStore, trie_key
from alignd.decoders.grammar.backends import BACKENDS, DEFAULT_BACKEND
from alignd.decoders.grammar.constraint import MaskConstraint
from alignd.decoders.grammar.factory import build_grammar, compile_grammar
from alignd.decoders.grammar.spec import GrammarKind, GrammarMode, GrammarSpec
from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "AsapConstraint",
    "AsapTrie",
    "GrammarKind",
    "GrammarMode",
    "GrammarSpec",
    "GrammarVocab",
    "MaskConstraint",
    "TrieStore",
    "build_grammar",
    "compile_grammar",
    "trie_key",
]
