"""The xgrammar backend (default): fast compiled masks, unlimited rollback."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from alignd.decoders.grammar.backends.base import GrammarBackend, Matcher, choice_ebnf, unpack_bitmask

if TYPE_CHECKING:
    from alignd.decoders.grammar.spec import GrammarSpec
    from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = ["XGrammarBackend", "XGrammarMatcher"]

# Compile threads per backend; the machine is shared and grammars compile in milliseconds.
COMPILER_THREADS = 2

# Compact JSON, as the engine's own structured outputs are configured: small models given free whitespace
# tend to write it until max_tokens runs out.
_COMPACT_JSON: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":")}


class XGrammarMatcher(Matcher):
    """An ``xgrammar.GrammarMatcher`` with a numpy bitmask."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self._vocab_size = vocab_size
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def fill_mask(self) -> np.ndarray:
        self._m.fill_next_token_bitmask(self._bitmask)
        return unpack_bitmask(self._bitmask, self._vocab_size)

    def accept(self, token_id: int) -> bool:
        if not 0 <= token_id < self._vocab_size:
            return False
        return bool(self._m.accept_token(int(token_id)))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._m.rollback(num_tokens)

    def is_stopped(self) -> bool:
        return bool(self._m.is_terminated())


class XGrammarBackend(GrammarBackend):
    """Compiles with one ``xgrammar.GrammarCompiler`` per vocabulary."""

    name = "xgrammar"

    def __init__(self, vocab: GrammarVocab) -> None:
        super().__init__(vocab)
        import xgrammar as xgr

        self._xgr = xgr
        if vocab.hf_tokenizer is not None:
            info = xgr.TokenizerInfo.from_huggingface(
                vocab.hf_tokenizer, vocab_size=vocab.vocab_size, stop_token_ids=list(vocab.eos_token_ids)
            )
        else:
            assert vocab.tokens is not None
            info = xgr.TokenizerInfo(
                list(vocab.tokens), vocab_size=vocab.vocab_size, stop_token_ids=list(vocab.eos_token_ids)
            )
        self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS)

    def _compile(self, spec: GrammarSpec) -> Any:
        c = self._compiler
        if spec.kind == "json_schema":
            return c.compile_json_schema(json.dumps(spec.schema_object()), **_COMPACT_JSON)
        if spec.kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}), **_COMPACT_JSON)
        if spec.kind == "regex":
            assert isinstance(spec.value, str)
            return c.compile_regex(spec.value)
        if spec.kind == "ebnf":
            assert isinstance(spec.value, str)
            return c.compile_grammar(spec.value)
        assert isinstance(spec.value, list)
        return c.compile_grammar(choice_ebnf(spec.value))

    def _matcher(self, compiled: Any) -> Matcher:
        m = self._xgr.GrammarMatcher(compiled, override_stop_tokens=list(self.vocab.eos_token_ids))
        return XGrammarMatcher(m, self.vocab.vocab_size)
