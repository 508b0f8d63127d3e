"""Nudging, written for clarity: greedy, one model call per token, one base call per probed word.

This follows the algorithm of ``alignd.decoders.nudging`` (its module docstring is the specification) the
slow, obvious way, like the authors' reference code: the aligner writes a block token by token; the base is
asked separately at every word start of the block (re-tokenizing the output plus the block up to there);
the base then writes token by token, stopping before the first word-start token whose top-1 probability is
below gamma. Nothing is batched or reused: the aligner's block is regenerated from scratch every round.

Each role keeps its own token ids of the output. Text a role wrote itself is kept as its own tokens; with
one shared tokenizer (``shared``) so are the other role's tokens; otherwise text the other role wrote is
appended by re-encoding the last few text tokens of the context together with the new text and keeping
the longest unchanged prefix (the one rule the specification fixes for this).

Models are ``LogProbFn`` (``ids -> full next-token log-distribution``, see :mod:`tests.reference.common`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tests.reference.common import LogProbFn

ANCHOR = 4


@dataclass
class RefRole:
    """One role: its model, tokenizer (``encode``/``decode``), prompt ids and end-of-sequence ids."""

    logprobs: LogProbFn
    tokenizer: object
    prompt_ids: list[int]
    eos: frozenset[int]


def is_word_start(prev: str, nxt: str) -> bool:
    """A whitespace run starts after a non-space, or a non-space follows whitespace."""
    return bool(prev) and bool(nxt) and prev.isspace() != nxt.isspace()


def _anchor(role: RefRole, ids: Sequence[int]) -> list[int]:
    out: list[int] = []
    for t in reversed(ids):
        if len(out) == ANCHOR or role.tokenizer.decode([t]) == "":
            break
        out.insert(0, t)
    return out


def text_after(role: RefRole, context: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after ``context``."""
    anchor = _anchor(role, context)
    head = role.tokenizer.decode(anchor)
    full = role.tokenizer.decode([*anchor, *new])
    if not full.startswith(head):
        return role.tokenizer.decode(list(new))
    return full[len(head) :]


def append_text(role: RefRole, ids: list[int], text: str, joiner: str = "") -> list[int]:
    """``ids`` followed by ``text`` written by another role (after ``joiner``, in this role only)."""
    if not text:
        return list(ids)
    anchor = _anchor(role, ids)
    full = role.tokenizer.encode(role.tokenizer.decode(anchor) + joiner + text)
    a = 0
    while a < len(anchor) and a < len(full) and full[a] == anchor[a]:
        a += 1
    return list(ids[: len(ids) - len(anchor) + a]) + list(full[a:])


def token_starts(role: RefRole, context: Sequence[int], ids: Sequence[int], text: str) -> list[int | None]:
    """Where each of ``ids`` starts in ``text`` (the text they add after ``context``); None if unclear: the
    text before it is not a prefix of ``text``, or ends in a replacement character (bytes of an unfinished
    character) that the token's own text does not follow unchanged (it completes or continues it)."""
    out: list[int | None] = []
    for k in range(len(ids)):
        t = text_after(role, context, ids[:k]) if k else ""
        ok = text.startswith(t)
        if ok and t.endswith("\ufffd"):
            own = role.tokenizer.decode([ids[k]])
            ok = own != "" and own[0] != "\ufffd" and text_after(role, context, ids[: k + 1]).startswith(t + own[0])
        out.append(len(t) if ok else None)
    return out


def _argmax(lp: torch.Tensor) -> tuple[int, float]:
    t = int(torch.argmax(lp))
    return t, math.exp(float(lp[t]))


def nudging_reference(
    base: RefRole,
    aligner: RefRole,
    *,
    gamma: float = 0.4,
    block_tokens: int = 16,
    max_tokens: int = 64,
    shared: bool = False,
    prompt_last_char: str = "",
    end_lookahead: bool = True,
) -> tuple[list[tuple[str, str]], str]:
    """Greedy nudging; returns ``([(role, text), ...], finish_reason)`` with consecutive texts of one
    role merged. Repetition checks are not part of the reference (turn them off in the decoder)."""
    out: list[tuple[str, str]] = []
    text = ""
    base_ids = list(base.prompt_ids)
    al_ids = list(aligner.prompt_ids)
    used = 0  # output tokens, counted in the base's tokenizer

    def write(role: str, piece: str) -> None:
        nonlocal text
        if not piece:
            return
        text += piece
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + piece)
        else:
            out.append((role, piece))

    def last_char() -> str:
        return text[-1:] if text else prompt_last_char

    while True:
        # the aligner's block, token by token
        block: list[int] = []
        ended = False
        for _ in range(block_tokens):
            t, _p = _argmax(aligner.logprobs(al_ids + block))
            if t in aligner.eos:
                ended = True
                break
            block.append(t)
        block_text = text_after(aligner, al_ids, block)
        if not block_text.strip():
            return out, "stop"

        # the block in the base's tokens (a space between a prompt ending in a word and an answer starting
        # with one, in the base's context only)
        joiner = " " if not text and prompt_last_char.strip() and not block_text[0].isspace() else ""
        if shared and not joiner:
            keep, b_new = len(base_ids), list(block)
        else:
            joined = append_text(base, base_ids, block_text, joiner)
            keep = 0
            while keep < len(base_ids) and keep < len(joined) and joined[keep] == base_ids[keep]:
                keep += 1
            b_new = joined[keep:]
        b_text = text_after(base, base_ids[:keep], b_new)
        lead = len(b_text) - len(block_text)
        starts = token_starts(base, base_ids[:keep], b_new, b_text)
        candidates = []
        prev = last_char()
        flags = [
            is_word_start(prev if i == 0 else block_text[i - 1], block_text[i])
            for i in range(len(block_text))
        ]
        for j in range(1, len(b_new)):
            s = starts[j]
            if s is None or s <= lead:
                continue
            p = s - lead
            if p < len(block_text) and flags[p] and block_text[:p].strip():
                candidates.append((p, j))

        # one base call per word start; a block in which the aligner ends is output whole (unless the
        # aligner's end is only seen when reached: then the base may take over before it)
        takeover = None
        for p, j in candidates if not (ended and end_lookahead) else []:
            context = base_ids[:keep] + b_new[:j]
            top, prob = _argmax(base.logprobs(context))
            shown = text_after(base, context, [top]) if top not in base.eos else ""
            agrees = top == b_new[j] or (shown != "" and block_text[p:].startswith(shown))
            if agrees or prob >= gamma:
                takeover = (p, j)
                break
        if takeover is not None:
            end_p, end_j = takeover
        elif ended or not candidates:
            end_p, end_j = len(block_text), len(b_new)
        else:
            al_starts = token_starts(aligner, al_ids, block, block_text)
            clean = [c for c in candidates if c[0] in al_starts]
            end_p, end_j = clean[-1] if clean else candidates[-1]

        # the aligner's words; output tokens are the base tokens that write some of them (not the ones
        # that only spell the joining space or a re-tokenized end of the context)
        ends = [*starts[1:], len(b_text)]
        first = next((j for j in range(len(b_new)) if ends[j] is None or ends[j] > lead), 0)
        first = min(first, end_j)
        if used + end_j - first >= max_tokens:
            idx = first + max_tokens - used
            # the text of the tokens that fit: up to the last clear token start at or before the limit
            known = [s for s in starts[: idx + 1] if s is not None]
            cut = known[-1] - lead if idx < len(starts) and known else end_p
            write("aligner", block_text[: max(0, min(cut, end_p))])
            return out, "length"
        write("aligner", block_text[:end_p])
        used += end_j - first
        base_ids = base_ids[:keep] + b_new[:end_j]
        al_starts = token_starts(aligner, al_ids, block, block_text) + [len(block_text)]
        if end_p in al_starts:
            al_ids = al_ids + block[: al_starts.index(end_p)]
        else:
            al_ids = append_text(aligner, al_ids, block_text[:end_p])
        if ended and takeover is None:
            return out, "stop"
        if takeover is None:
            continue

        # the base writes, token by token
        first = True
        written = ""
        written_ids: list[int] = []
        while True:
            if used >= max_tokens:
                return out, "length"
            lp = base.logprobs(base_ids)
            t, _ = _argmax(lp)
            top_p = math.exp(float(lp.max()))
            if t in base.eos:
                if first or top_p >= gamma:
                    return out, "stop"
                break
            piece = text_after(base, base_ids, [t])
            starts_word = bool(piece) and is_word_start(last_char(), piece[0])
            if starts_word and not first and top_p < gamma:
                break
            write("base", piece)
            written += piece
            written_ids.append(t)
            base_ids.append(t)
            used += 1
            first = False
        # one tokenizer: the aligner reads the base's tokens; else the base's text in its own tokens
        al_ids = al_ids + written_ids if shared else append_text(aligner, al_ids, written)


__all__ = ["RefRole", "append_text", "is_word_start", "nudging_reference", "text_after", "token_starts"]
