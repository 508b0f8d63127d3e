"""Plain grammar-constrained decoding: :class:`MaskConstraint` implements the contract's
:class:`~alignd.decoders.contract.GrammarConstraint` over any backend :class:`Matcher`."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from alignd.decoders.contract import DecoderError
from alignd.decoders.grammar.backends.base import Matcher

__all__ = ["MaskConstraint"]


class MaskConstraint:
    """The grammar as a mask: allowed tokens keep their probability, the rest get none.

    The mask of the current state is computed once and cached until the state changes, so callers may ask
    for it (and for :meth:`is_terminated`) as often as they like. The returned mask is read-only.
    """

    def __init__(self, matcher: Matcher, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._eos_array = np.array(sorted(self.eos_token_ids), dtype=np.int64)
        self._mask: np.ndarray | None = None
        self.num_accepted = 0

    def allowed_mask(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next (EOS included when the
        text so far is complete; nothing once EOS has been accepted)."""
        if self._mask is None:
            if self._matcher.is_stopped():
                mask = np.zeros(self.vocab_size, dtype=bool)
            else:
                mask = self._matcher.fill_mask()
            mask.flags.writeable = False
            self._mask = mask
        return self._mask

    def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> np.ndarray | None:
        """Plain constrained decoding does not reweight: ``None``."""
        return None

    def advance(self, token_id: int) -> None:
        """Accept the chosen token; ``DecoderError`` if the grammar does not allow it."""
        if not self._matcher.accept(int(token_id)):
            raise DecoderError(f"token {token_id} is not allowed by the grammar here", param="grammar")
        self._mask = None
        self.num_accepted += 1

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""
        if num_tokens < 0 or num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        self._matcher.rollback(num_tokens)
        self._mask = None
        self.num_accepted -= num_tokens

    def is_terminated(self) -> bool:
        """Whether the grammar is complete and nothing but EOS may follow (or EOS was accepted)."""
        if self._matcher.is_stopped():
            return True
        mask = self.allowed_mask()
        if int(np.count_nonzero(mask)) > self._eos_array.size:
            return False
        return not np.any(np.delete(mask, self._eos_array[self._eos_array < self.vocab_size]))

    def finish(self) -> None:
        """Nothing to learn from a finished choice in plain constrained decoding."""
