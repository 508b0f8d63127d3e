"""The llguidance backend (optional): Earley-based masks, lazily computed, with rollback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from alignd.decoders.contract import DecoderError
from alignd.decoders.grammar.backends.base import GrammarBackend, Matcher, choice_ebnf, unpack_bitmask

if TYPE_CHECKING:
    from alignd.decoders.grammar.spec import GrammarSpec
    from alignd.decoders.grammar.vocab import GrammarVocab

__all__ = ["LLGuidanceBackend", "LLGuidanceMatcher"]


def strict_schema(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever ``properties`` are listed and it is not
    set: what xgrammar's strict mode (and OpenAI's strict structured outputs) assume, so both backends
    accept the same objects."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            out[key] = strict_schema(value)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class _TokenList:
    """The tokenizer shape ``llguidance.TokenizerWrapper`` wants, over a plain list of token texts.

    Encoding (used by llguidance to split grammar literals into tokens) is greedy longest match over the
    list; bytes no token spells are skipped.
    """

    def __init__(self, tokens: Sequence[str | bytes], eos: int) -> None:
        self.tokens = [t if isinstance(t, bytes) else t.encode() for t in tokens]
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = [eos]
        self._index = {t: i for i, t in enumerate(self.tokens) if i != eos and t}
        self._longest = max((len(t) for t in self.tokens), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                hit = self._index.get(data[i : i + n])
                if hit is not None:
                    out.append(hit)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells: nothing the grammar could make the model write anyway
        return out


class LLGuidanceMatcher(Matcher):
    """An ``llguidance.LLMatcher`` with a numpy bitmask.

    llguidance stops on its own once nothing but the end can follow; the contract wants end-of-sequence
    allowed there (and accepted like any token), so this matcher allows and accepts it itself in that state.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance.numpy as lnp

        self._m = matcher
        self._fill = lnp.fill_next_token_bitmask
        self._vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)
        self._bitmask = lnp.allocate_token_bitmask(1, vocab_size)
        self._ended = False  # an end-of-sequence token was accepted
        self._own_eos = False  # ... by this wrapper, after llguidance had stopped on its own

    def fill_mask(self) -> np.ndarray:
        if self._m.is_stopped():
            mask = np.zeros(self._vocab_size, dtype=bool)
            if not self._ended:
                mask[[t for t in self._eos if t < self._vocab_size]] = True
            return mask
        self._fill(self._m, self._bitmask, 0)
        return unpack_bitmask(self._bitmask, self._vocab_size)

    def accept(self, token_id: int) -> bool:
        if not 0 <= token_id < self._vocab_size or self._m.is_error() or self._ended:
            return False
        if self._m.is_stopped():
            if token_id not in self._eos:
                return False
            self._ended = self._own_eos = True
            return True
        probe = self._m.deep_copy()  # a refused token puts an llguidance matcher in an error state for good
        if not probe.consume_token(int(token_id)) or probe.is_error():
            return False
        self._m.consume_token(int(token_id))
        self._ended = token_id in self._eos
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self._own_eos:
            self._own_eos = False
            num_tokens -= 1
        self._ended = False
        if num_tokens > 0 and not self._m.rollback(num_tokens):
            raise ValueError(f"llguidance cannot roll back {num_tokens} tokens: {self._m.get_error()}")

    def is_stopped(self) -> bool:
        return self._ended


class LLGuidanceBackend(GrammarBackend):
    """Compiles grammars to llguidance's grammar text and checks them against the tokenizer."""

    name = "llguidance"

    def __init__(self, vocab: GrammarVocab) -> None:
        super().__init__(vocab)
        import llguidance

        self._llg = llguidance
        eos = list(vocab.eos_token_ids)
        if vocab.hf_tokenizer is not None:
            import llguidance.hf

            self._tok = llguidance.hf.from_tokenizer(
                vocab.hf_tokenizer, n_vocab=vocab.vocab_size, eos_token=eos
            )
        else:
            assert vocab.tokens is not None
            wrapper = llguidance.TokenizerWrapper(_TokenList(vocab.tokens, eos[0]))
            self._tok = llguidance.LLTokenizer(wrapper, n_vocab=vocab.vocab_size, eos_token=eos)

    def _compile(self, spec: GrammarSpec) -> Any:
        m = self._llg.LLMatcher
        if spec.kind == "json_schema":
            grammar = m.grammar_from_json_schema(json.dumps(strict_schema(spec.schema_object())))
        elif spec.kind == "json_object":
            grammar = m.grammar_from_json_schema(json.dumps({"type": "object"}))
        elif spec.kind == "regex":
            assert isinstance(spec.value, str)
            grammar = m.grammar_from_regex(spec.value)
        else:
            ebnf = spec.value if spec.kind == "ebnf" else choice_ebnf(spec.value)  # type: ignore[arg-type]
            assert isinstance(ebnf, str)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = m.grammar_from_lark(gbnf_to_lark(ebnf))
        error = m.validate_grammar(grammar, self._tok)
        if error and not error.startswith("WARNING"):
            raise DecoderError(f"invalid {spec.kind} grammar: {error}", param="grammar")
        return grammar

    def _matcher(self, compiled: Any) -> Matcher:
        matcher = self._llg.LLMatcher(self._tok, compiled, log_level=0)
        if matcher.is_error():
            raise DecoderError(f"invalid grammar: {matcher.get_error()}", param="grammar")
        return LLGuidanceMatcher(matcher, self.vocab.vocab_size, self.vocab.eos_token_ids)
