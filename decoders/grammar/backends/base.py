"""The interface every grammar engine implements: compile a :class:`GrammarSpec`, then match tokens."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from alignd.decoders.contract import DecoderError

if TYPE_CHECKING:
    from alignd.decoders.grammar.spec import GrammarSpec
    from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = ["COMPILED_CACHE_SIZE", "GrammarBackend", "Matcher"]

COMPILED_CACHE_SIZE = 256


class Matcher(ABC):
    """One choice's position in a compiled grammar."""

    @abstractmethod
    def fill_mask(self) -> np.ndarray:
        """Boolean mask over the model's vocabulary of the tokens allowed next."""

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance by one token; ``False`` (state unchanged) if the grammar does not allow it."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    @abstractmethod
    def is_stopped(self) -> bool:
        """Whether an end-of-sequence token has been accepted."""


class GrammarBackend(ABC):
    """Compiles grammars for one vocabulary (cached by the grammar's text) and makes matchers."""

    name: str

    def __init__(self, vocab: GrammarVocab) -> None:
        self.vocab = vocab
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled form of ``spec`` (cached, LRU); ``DecoderError`` naming ``grammar`` if invalid."""
        key = spec.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            compiled = self._compile(spec)
        except DecoderError:
            raise
        except Exception as exc:  # engines raise RuntimeError, ValueError or their own types
            raise DecoderError(f"invalid {spec.kind} grammar: {exc}", param="grammar") from exc
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A fresh matcher at the start of ``spec``."""
        return self._matcher(self.compile(spec))

    @abstractmethod
    def _compile(self, spec: GrammarSpec) -> Any: ...

    @abstractmethod
    def _matcher(self, compiled: Any) -> Matcher: ...


def choice_ebnf(choices: list[str]) -> str:
    """A GBNF grammar whose language is exactly ``choices``."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """A boolean vector from a little-endian int32 bitmask (bit ``i % 32`` of word ``i // 32``)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
