"""From decided token ids to :class:`~alignd.decoders.contract.Emit` events: detokenizing and stop strings.

:class:`OutputStream` detokenizes the output incrementally (the way vLLM does: a few tokens of context are
re-decoded with each new token so multi-token characters and leading spaces come out right), watches for
stop strings and holds back any tail of text that could still become one, so that a stop string never
reaches the client. When a stop string appears the text is cut where it starts. Every :class:`Emit` carries
its ``text`` (never left for the loop to detokenize), its token ids, and per-token log-probabilities when
every token in it has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from alignd.decoders.contract import Emit, Tokenizer

__all__ = ["OutputStream"]

_PROMPT_CONTEXT_TOKENS = 5


@dataclass
class _Pending:
    token_id: int
    start: int  # offset of this token's text in the output text
    end: int
    reason: str
    logprob: float | None
    top_logprobs: dict[int, float] | None


class OutputStream:
    """Turns decided tokens into :class:`Emit` events, honouring stop strings.

    Parameters
    ----------
    tokenizer:
        The output role's tokenizer.
    role:
        The role named in the emitted events.
    stop_strings:
        Strings that end the output (excluded from it).
    prompt_ids:
        The output role's prompt; its last few tokens seed the detokenizer so the first output token
        keeps its leading space.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        role: str,
        stop_strings: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._role = role
        self._stops = tuple(s for s in stop_strings if s)
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._n_output = 0
        self.text = ""
        """All output text decoded so far (including any held-back tail)."""
        self._emitted_to = 0  # text offset up to which Emit events were yielded
        self._pending: list[_Pending] = []
        self.stopped = False
        """Whether a stop string was found (the output is over)."""

    @property
    def num_tokens(self) -> int:
        """How many tokens were pushed."""
        return self._n_output

    def _decode_delta(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""  # an incomplete character: wait for the next token

    def push(
        self,
        token_id: int,
        reason: str,
        logprob: float | None = None,
        top_logprobs: dict[int, float] | None = None,
    ) -> list[Emit]:
        """Add one decided token; returns the events that are now safe to send.

        After a stop string appears, :attr:`stopped` is true and the returned events end just before it.
        """
        if self.stopped:
            raise RuntimeError("push after the output stopped")
        self._n_output += 1
        delta = self._decode_delta(token_id)
        start = len(self.text)
        self.text += delta
        self._pending.append(_Pending(token_id, start, len(self.text), reason, logprob, top_logprobs))
        cut = self._find_stop(start)
        if cut is not None:
            self.stopped = True
            return self._release(cut, final=True)
        return self._release(len(self.text) - self._held_tail(), final=False)

    def finish(self, drop_tail: re.Pattern[str] | None = None) -> list[Emit]:
        """Release everything still held back (end of output). ``drop_tail`` removes a matching suffix of
        the held-back text (URIAL drops a closing code fence this way)."""
        end = len(self.text)
        if drop_tail is not None and self._pending:
            held = self.text[self._emitted_to :]
            m = drop_tail.search(held)
            if m is not None and m.end() == len(held):
                end = self._emitted_to + m.start()
        return self._release(end, final=True)

    def _find_stop(self, new_from: int) -> int | None:
        best: int | None = None
        for s in self._stops:
            idx = self.text.find(s, max(0, new_from - len(s) + 1))
            if idx >= 0 and (best is None or idx < best):
                best = idx
        return best

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _release(self, safe_end: int, final: bool) -> list[Emit]:
        """Emit pending tokens whose text ends by ``safe_end``; when ``final``, cut the rest there."""
        if final:
            # tokens whose text starts before the cut (an empty-text token belongs where it sits)
            group = [p for p in self._pending if p.start < safe_end or p.start == p.end <= safe_end]
            self._pending = []
            end = safe_end
        else:
            n = 0
            while n < len(self._pending) and self._pending[n].end <= safe_end:
                n += 1
            # tokens without text yet (a character split across tokens) wait for the token completing it
            while n > 0 and self._pending[n - 1].start == self._pending[n - 1].end:
                n -= 1
            group, self._pending = self._pending[:n], self._pending[n:]
            end = group[-1].end if group else self._emitted_to
        if not group:
            return []
        end = max(self._emitted_to, min(end, len(self.text)))
        text = self.text[self._emitted_to : end]
        self._emitted_to = end
        return [self._make_emit(group, text)]

    def _make_emit(self, group: list[_Pending], text: str) -> Emit:
        reasons: list[str] = []
        for p in group:
            if p.reason not in reasons:
                reasons.append(p.reason)
        logprobs: tuple[float, ...] = ()
        if all(p.logprob is not None for p in group):
            logprobs = tuple(float(p.logprob) for p in group)  # type: ignore[arg-type]
        tops: tuple[dict[int, float], ...] = ()
        if all(p.top_logprobs is not None for p in group):
            tops = tuple(p.top_logprobs for p in group)  # type: ignore[misc]
        return Emit(
            role=self._role,
            reason="; ".join(reasons),
            token_ids=tuple(p.token_id for p in group),
            text=text,
            logprobs=logprobs,
            top_logprobs=tops,
        )
