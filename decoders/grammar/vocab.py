"""The vocabulary a grammar is compiled against: :class:`GrammarVocab` (the ``tokenizer_info``)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignd.decoders.contract import DecoderError

__all__ = ["GrammarVocab"]

_BY_TOKENIZER: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], GrammarVocab]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


@dataclass(eq=False)
class GrammarVocab:
    """A model's vocabulary as grammar backends need it, plus the backends compiled against it.

    Build one per hosted model and reuse it: it owns each backend's compiler and compiled-grammar cache.
    Use :meth:`from_huggingface` for a real tokenizer, :meth:`from_tokens` for a list of token strings
    (tests, or tokenizers that are not HuggingFace ones).

    ``vocab_size`` is the model's (the width of its logits), which may exceed the tokenizer's length;
    ids past the tokenizer's vocabulary are never allowed. ``eos_token_ids`` are the ids a grammar
    allows once its text is complete.
    """

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    hf_tokenizer: Any = None
    tokens: Sequence[str | bytes] | None = None
    _backends: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.hf_tokenizer is None and self.tokens is None:
            raise ValueError("GrammarVocab needs a HuggingFace tokenizer or a token list")
        if not self.eos_token_ids:
            raise ValueError("GrammarVocab needs at least one end-of-sequence id")

    @classmethod
    def from_huggingface(
        cls, tokenizer: Any, vocab_size: int | None = None, eos_token_ids: Iterable[int] | None = None
    ) -> GrammarVocab:
        """The vocabulary of a HuggingFace tokenizer; one shared object per (tokenizer, size, eos ids)."""
        size = int(vocab_size if vocab_size is not None else len(tokenizer))
        eos = tuple(sorted(set(eos_token_ids or ())))
        if not eos:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has no eos_token_id; pass eos_token_ids")
            eos = (int(tokenizer.eos_token_id),)
        key = (size, eos)
        with _LOCK:
            per_tok = _BY_TOKENIZER.setdefault(tokenizer, {})
            if key not in per_tok:
                per_tok[key] = cls(vocab_size=size, eos_token_ids=eos, hf_tokenizer=tokenizer)
            return per_tok[key]

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[str | bytes], eos_token_ids: Iterable[int], vocab_size: int | None = None
    ) -> GrammarVocab:
        """The vocabulary given as the decoded text (or bytes) of every token id, in id order."""
        return cls(
            vocab_size=int(vocab_size if vocab_size is not None else len(tokens)),
            eos_token_ids=tuple(sorted(set(eos_token_ids))),
            tokens=list(tokens),
        )

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> GrammarVocab:
        """The vocabulary of a role's tokenizer: a HuggingFace tokenizer, or a wrapper exposing one as
        ``hf_tokenizer``, or one exposing ``grammar_vocab``; ``DecoderError`` otherwise."""
        existing = getattr(tokenizer, "grammar_vocab", None)
        if isinstance(existing, GrammarVocab):
            return existing
        hf = tokenizer if _is_hf_tokenizer(tokenizer) else getattr(tokenizer, "hf_tokenizer", None)
        if hf is None or not _is_hf_tokenizer(hf):
            raise DecoderError(
                "this model's tokenizer cannot be used for grammars (not a HuggingFace tokenizer)",
                param="grammar",
            )
        return cls.from_huggingface(hf, vocab_size, eos_token_ids)

    def backend(self, name: str) -> Any:
        """The backend ``name`` (``xgrammar`` or ``llguidance``) over this vocabulary, built once."""
        with self._lock:
            if name not in self._backends:
                from alignd.decoders.grammar.backends import make_backend

                self._backends[name] = make_backend(name, self)
            return self._backends[name]


def _is_hf_tokenizer(obj: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers ships with vLLM
        return False
    return isinstance(obj, PreTrainedTokenizerBase)
