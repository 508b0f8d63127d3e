"""Building a choice's grammar constraint: :func:`build_grammar`."""

from __future__ import annotations

from collections.abc import Sequence

from alignd.decoders.contract import GrammarConstraint
from alignd.decoders.grammar.asap import AsapConstraint, TrieStore, trie_key
from alignd.decoders.grammar.backends import DEFAULT_BACKEND
from alignd.decoders.grammar.constraint import MaskConstraint
from alignd.decoders.grammar.spec import GrammarSpec
from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = ["build_grammar", "compile_grammar"]


def compile_grammar(
    spec: GrammarSpec, tokenizer_info: GrammarVocab, *, backend: str = DEFAULT_BACKEND
) -> None:
    """Compile ``spec`` now (cached), so a bad grammar is a ``DecoderError`` at admission, not mid-stream."""
    tokenizer_info.backend(backend).compile(spec)


def build_grammar(
    spec: GrammarSpec,
    tokenizer_info: GrammarVocab,
    *,
    store: TrieStore | None = None,
    model: str = "",
    prompt_ids: Sequence[int] = (),
    backend: str = DEFAULT_BACKEND,
) -> GrammarConstraint:
    """A fresh constraint for one choice (build one per choice: it holds that choice's parser state).

    Parameters
    ----------
    spec
        The grammar and mode.
    tokenizer_info
        The vocabulary of the model the constraint filters (one :class:`GrammarVocab` per hosted model,
        reused: it caches compiled grammars).
    store, model, prompt_ids
        ASAp only (``spec.mode == "asap"``): the shared :class:`TrieStore` and the hosted model's name
        and prompt token ids, which key the trie, so samples of the same (model, grammar, prompt) learn
        from each other across the ``n`` choices of a request and across requests.
    backend
        ``xgrammar`` (default) or ``llguidance``.

    Raises
    ------
    DecoderError
        The grammar does not compile (``param="grammar"``).
    ValueError
        ASAp mode without a ``store``.
    """
    engine = tokenizer_info.backend(backend)
    matcher = engine.matcher(spec)
    if spec.mode == "constrained":
        return MaskConstraint(matcher, tokenizer_info.vocab_size, tokenizer_info.eos_token_ids)
    if store is None:
        raise ValueError("ASAp mode needs a TrieStore (store=...) to learn across samples")
    trie = store.get(trie_key(model, spec.cache_key(), prompt_ids))
    return AsapConstraint(matcher, tokenizer_info.vocab_size, tokenizer_info.eos_token_ids, trie, store)
