"""Nudging (Fei et al., "Nudging: Inference-time Alignment via Model Collaboration"): a small aligned model
(the *aligner*) writes the few words where a base model is unsure; the base writes everything else.

The method is text-level: base and aligner may have unrelated tokenizers, each role keeps its own prompt
(the server builds them: the aligner's chat template, the base's plain format) and its own token ids of
the shared output text. Where both tokenizers are the same (one vocabulary, even loaded from two model
directories), the two roles share token ids and nothing is re-tokenized.

One round
---------
1. **The aligner proposes a block** of up to ``block_tokens`` tokens (16 in the reference). Tokens of the
   previous block that were not used and still continue the output exactly (*pending* tokens, see below)
   are reused. Greedy decoding grows the block one token at a time through the aligner's session, and
   step 2 asks the base at each word start as soon as it is known; sampling generates the block's missing
   tokens natively with one :class:`GenerateOp`. With ``aligner_end_lookahead`` (the default, the
   reference's rule) a take-over is decided on the complete block; without it the aligner stops writing
   at the hand-over (one token past it at most), which saves most of its tokens but lets the base write on
   where the aligner would have ended. With the lookahead and greedy decoding the two roles step side by
   side (one batch, so two engines compute at the same time): the aligner's next token with the base's
   probe, and, once the base would take over, the aligner's remaining tokens with the base's first chunk
   of step 3 written from there. That chunk is used when the decision on the complete block stands, and
   dropped otherwise (the aligner ended inside its block, or the take-over moved).
2. **The base finds where to take over**: the block is re-tokenized in the base's vocabulary and, at each
   word start of the block after its first word that has block text after it, in order, one
   :class:`ViewOp` asks the base's session for its top-1 token and its raw (unwarped) probability there.
   The base takes over at the first word start where its top-1 token agrees with the aligner's next token
   (a non-empty prefix of the aligner's text there, or, once the block is complete, the same id) or where
   its top-1 probability is at least ``gamma``. (When the aligner's text there is still a proper prefix of
   the base's token, the block grows before that word start is decided, so a block grown token by token
   decides as the complete block would.) The aligner's words before that point are output. If no word
   start qualifies, the aligner's block is output up to its last word start where one of the aligner's
   tokens starts (else its last word start: the last word may be cut by the block size) and the rest
   stays pending for the next round; a block without any word start is output whole. If the aligner ends
   inside its block, the block is output whole and decoding stops (as in the reference: the aligner decides
   how an answer ends); without ``aligner_end_lookahead`` only if it ends before the base takes over.
3. **The base writes** in chunks of ``base_chunk_tokens``, each token with its top-1 view: greedy
   decoding steps the base's session one :class:`ViewOp` per token for the first chunk of its turn (its
   top-1 is the greedy token, and the chunk ends at the token where it would be cut); once a chunk was kept
   whole the base is on a run and writes the next chunks natively with :class:`GenerateOp`, as sampling
   always does (the same greedy tokens; a cut drops the rest). The first token after a take-over is always
   kept; after that the chunk is cut at the first word start whose first token had top-1 probability
   below ``gamma`` (an end-of-sequence token counts as a word start), and the next round starts there. A
   chunk without such a word start is kept whole and the base writes on.

Decoding stops on the aligner's end (step 2), on the base's end (an end-of-sequence token kept in step 3),
on repetition (a base chunk of at least ``repetition_min_words`` words that already appears in the
output, or the aligner's words of a round repeating those of the previous ``max_repeated_nudges``
rounds), on a stop string, or at ``max_tokens`` tokens counted in the base's tokenizer (the output role).

Word starts
-----------
Words are whitespace-delimited, as in the reference. A *word start* is a position in the text where a
whitespace run begins after a non-space character, or where a non-space character follows whitespace.
Tokenizers that attach the space to the next token (``"Ġworld"``, ``"▁world"``) have a token boundary
at the first kind, those that attach it to the previous token at the second, so every tokenizer sees one
decision point per word. Only word starts that are also token boundaries of the role being asked are
decision points (the base can only be asked what comes after a whole token). A token starts a word when
a word start falls exactly at its first character.

Cost, against the reference (fywalter/nudging)
----------------------------------------------
The reference asks the base for a 16-token completion at every probed word and keeps one token of it,
and throws away the aligner's unused tokens each round. Here the probes are steps of one streaming-input
session of the base: each appends only the tokens since the previous probe (or since the base's last
chunk), so the base never recomputes its context and computes output logits only where it is asked
(scoring the block with ``prompt_logprobs`` instead re-ran the whole context through the model and its
output layer, about 0.9 s per round on Gemma-3's 262k vocabulary on CPU). The base's chunks are kept up
to the first unsure word start; unused aligner tokens are kept while the output still follows them
(pending tokens: after the base writes, they stay valid only if the base wrote exactly the aligner's next
words, ending at one of the aligner's token boundaries; otherwise they are dropped and regenerated from
the new output).

Differences from the reference, on purpose
------------------------------------------
* The base's chunk is cut at word starts only; the reference cuts at any token below ``gamma``, even
  inside a word, which hands a half word to an aligner with another tokenizer.
* With ``aligner_end_lookahead: false``, where the aligner ends inside its block the base is still asked
  at the block's word starts before the end (a block grown token by token cannot know of an end it has not
  reached); the reference outputs such a block without asking the base, as the default does.
* The base's end-of-sequence ends decoding when the base is confident about it (top-1 probability at
  least ``gamma``); the reference hands the turn back to the aligner.
* Repetition ends decoding; the reference strips repeated suffixes from the final text afterwards, which
  a streaming server cannot do.
* ``gamma`` defaults to 0.4 (the reference's README; its command line defaults to 0.3).
* The reference gives both roles the same answer start ("Answer:"); here each role keeps its own prompt
  format, so when the base's prompt ends in a word (``Answer:``) and the aligner opens without a space
  (after its chat template's newline), the base's context gets a joining space that is not output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from alignd.decoders.contract import (
    Decoder,
    DecoderContext,
    DecoderError,
    DecoderParams,
    DecoderRun,
    Emit,
    EngineOp,
    Finish,
    GeneratedBlock,
    GenerateOp,
    RoleContext,
    RoleSpec,
    SamplingOptions,
    StepView,
    Tokenizer,
    ViewOp,
    ViewSpec,
)

__all__ = ["Nudging", "NudgingParams", "is_word_start"]

_ANCHOR_TOKENS = 4  # tokens of context re-decoded with new tokens so leading spaces come out right


class NudgingParams(DecoderParams):
    """Parameters of nudging."""

    gamma: float = Field(
        0.4,
        gt=0.0,
        le=1.0,
        description="the base writes while its top-1 probability at word starts is >= gamma",
    )
    block_tokens: int = Field(16, ge=2, le=256, description="tokens the aligner proposes per round")
    base_chunk_tokens: int = Field(16, ge=1, le=512, description="tokens the base writes per engine call")
    shared_tokenizer: bool | None = Field(
        None,
        description="whether base and aligner share a tokenizer (work on token ids); null: detect",
    )
    stop_on_repetition: bool = Field(True, description="stop when the output starts repeating itself")
    repetition_min_words: int = Field(
        6, ge=2, description="a base chunk of at least this many words already in the output is a repetition"
    )
    max_repeated_nudges: int = Field(
        3, ge=1, description="stop when the aligner's words of a round equal those of this many rounds before"
    )
    aligner_end_lookahead: bool = Field(
        True,
        description="complete the aligner's block before the base takes over, so that an end inside it ends "
        "the answer (the reference's rule); false: the aligner stops writing at the hand-over (faster; the "
        "base may then write past where the aligner would have ended)",
    )


def _is_space(ch: str) -> bool:
    return ch.isspace()


def is_word_start(prev_char: str, next_char: str) -> bool:
    """Whether a word start lies between ``prev_char`` and ``next_char`` (see the module docstring).

    The start of the text (``prev_char == ""``) is not a word start: it is where the output already is.
    """
    if not prev_char or not next_char:
        return False
    return _is_space(prev_char) != _is_space(next_char)


@dataclass
class _Segment:
    """Tokens that continue a role's context ``ids[:keep]``, and the text they add.

    ``text`` is what the tokens decode to after ``ids[:keep]``; its first ``lead`` characters re-spell the
    tail of the old context that re-tokenizing merged away (usually 0). ``offsets[k]`` is where token
    ``k`` starts in ``text`` (``offsets[len(ids)] == len(text)``), ``None`` where that is not a clean
    character boundary.
    """

    keep: int
    ids: list[int]
    text: str
    lead: int
    offsets: list[int | None]

    def index_at(self, rel: int) -> int | None:
        """The token index starting at ``rel`` characters into the new text, if one does."""
        target = rel + self.lead
        for k, off in enumerate(self.offsets):
            if off == target:
                return k
        return None


@dataclass
class _Track:
    """One role's tokenizer and its context: prompt ids followed by its ids of the output so far."""

    tok: Tokenizer
    ids: list[int]
    eos: frozenset[int]
    _special: dict[int, bool] = field(default_factory=dict)

    def _is_special(self, t: int) -> bool:
        s = self._special.get(t)
        if s is None:
            s = self._special[t] = self.tok.decode([t]) == ""
        return s

    def anchor(self, context: Sequence[int]) -> list[int]:
        """The last few text-bearing tokens of ``context`` (stopping at special tokens, which decode to
        nothing and must never be re-tokenized away)."""
        out: list[int] = []
        i = len(context) - 1
        while i >= 0 and len(out) < _ANCHOR_TOKENS and not self._is_special(context[i]):
            out.append(context[i])
            i -= 1
        out.reverse()
        return out

    def decode_after(self, context: Sequence[int], new_ids: Sequence[int]) -> tuple[str, list[int | None]]:
        """The text ``new_ids`` add after ``context`` and each token's start offset in it."""
        anchor = self.anchor(context)
        head = self.tok.decode(anchor)
        full = self.tok.decode([*anchor, *new_ids])
        if not full.startswith(head):
            anchor, head, full = [], "", self.tok.decode(list(new_ids))
        text = full[len(head) :]
        offsets: list[int | None] = [0]
        # prefixes[k]: the text of anchor + new_ids[:k + 1]
        prefixes = [self.tok.decode([*anchor, *new_ids[: k + 1]]) for k in range(len(new_ids) - 1)] + [full]
        for k in range(1, len(new_ids)):
            t = prefixes[k - 1]
            ok = full.startswith(t) and len(t) >= len(head)
            if ok and t.endswith("\ufffd"):
                # bytes of a character token k may still be completing (it starts none then), or bytes
                # that stay invalid (U+FFFD in the output, a character like any other, followed by its own)
                own = self.tok.decode([new_ids[k]])
                ok = own[:1] not in ("", "\ufffd") and prefixes[k].startswith(t + own[0])
            offsets.append(len(t) - len(head) if ok else None)
        if new_ids:
            offsets.append(len(text))
        return text, offsets

    def segment(self, new_ids: Sequence[int], context: Sequence[int] | None = None) -> _Segment:
        """Native tokens appended to the whole context (or to ``context``, a context it will hold)."""
        context = self.ids if context is None else context
        text, offsets = self.decode_after(context, new_ids)
        return _Segment(len(context), list(new_ids), text, 0, offsets)

    def encode(self, text: str, joiner: str = "") -> _Segment:
        """Another role's text in this role's tokens, appended to the context (re-tokenizing its last
        tokens if they merge with the text); ``joiner`` goes between the context and the text in this
        role's tokens only (it is not output)."""
        if not text:
            return _Segment(len(self.ids), [], "", 0, [0])
        anchor = self.anchor(self.ids)
        full = self.tok.encode(self.tok.decode(anchor) + joiner + text)
        a = 0
        while a < len(anchor) and a < len(full) and full[a] == anchor[a]:
            a += 1
        keep = len(self.ids) - len(anchor) + a
        new_ids = full[a:]
        seg_text, offsets = self.decode_after(self.ids[:keep], new_ids)
        return _Segment(keep, new_ids, seg_text, max(0, len(seg_text) - len(text)), offsets)

    def apply(self, seg: _Segment, upto: int | None = None) -> None:
        """Make ``ids[:seg.keep] + seg.ids[:upto]`` the context."""
        del self.ids[seg.keep :]
        self.ids.extend(seg.ids if upto is None else seg.ids[:upto])


@dataclass
class _Piece:
    """Output decided by one role, in the base's tokens (``offsets`` as in :class:`_Segment`)."""

    role: str
    reason: str
    text: str
    ids: list[int]
    offsets: list[int | None]

    def cut_chars(self, c: int) -> _Piece:
        """The first ``c`` characters, with the tokens that write them."""
        n = 0
        for k in range(len(self.ids)):
            off = self.offsets[k]
            if off is not None and off < c:
                n = k + 1
        return _Piece(self.role, self.reason, self.text[:c], self.ids[:n], self.offsets[: n + 1])

    def cut_tokens(self, n: int) -> _Piece:
        """The first ``n`` tokens and the text they write."""
        c = next((o for o in reversed(self.offsets[: n + 1]) if o is not None), 0)
        return _Piece(self.role, self.reason, self.text[:c], self.ids[:n], self.offsets[: n + 1])


@dataclass
class _EarlyChunk:
    """The base's first chunk after a take-over, written while the aligner completed its block: from
    ``context``, with the output ending in the character ``prev``."""

    context: tuple[int, ...]
    prev: str
    chunk: GeneratedBlock

    def starts_at(self, base_ids: Sequence[int], output: str) -> bool:
        """Whether the decision led where the chunk starts."""
        return output[-1:] == self.prev and tuple(base_ids) == self.context

    def first(self, n: int) -> GeneratedBlock:
        """The chunk as :meth:`_Run.greedy_chunk` writes it with ``want == n`` (greedy tokens do not depend on
        how far a chunk goes)."""
        c = self.chunk
        if len(c.token_ids) <= n:
            return c
        return GeneratedBlock(token_ids=c.token_ids[:n], views=c.views[:n], finished=False)


class _Writer:
    """Collects decided pieces; releases them as :class:`Emit` events once no stop string can start in
    them, cuts the output at a stop string or at ``max_tokens`` base tokens."""

    def __init__(self, stop_strings: Sequence[str], max_tokens: int) -> None:
        self.stops = tuple(s for s in stop_strings if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.max_tokens = max_tokens
        self.text = ""
        self.num_tokens = 0
        self.finish: Finish | None = None
        self._queue: list[tuple[_Piece, int]] = []  # pieces not yet released, with their start offsets

    @property
    def room(self) -> int:
        """Base tokens left before ``max_tokens``."""
        return self.max_tokens - self.num_tokens

    def add(self, piece: _Piece) -> list[Emit]:
        """Add a decided piece; afterwards :attr:`finish` is set if the output is over."""
        if self.finish is not None:
            return []
        limit = len(piece.ids) >= self.room
        if len(piece.ids) > self.room:
            piece = piece.cut_tokens(self.room)
        start = len(self.text)
        self.text += piece.text
        self.num_tokens += len(piece.ids)
        self._queue.append((piece, start))
        hit = self._find_stop(start)
        if hit is not None:
            self.finish = Finish("stop")
            return self._release(hit, final=True)
        if limit:
            self.finish = Finish("length")
            return self._release(len(self.text), final=True)
        return self._release(len(self.text) - self.hold, final=False)

    def close(self, reason: str) -> list[Emit]:
        """End the output (``stop`` or ``length``) and release everything held back."""
        if self.finish is None:
            self.finish = Finish("stop" if reason == "stop" else "length")
        return self._release(len(self.text), final=True)

    def _find_stop(self, start: int) -> int | None:
        best: int | None = None
        for s in self.stops:
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _release(self, upto: int, final: bool) -> list[Emit]:
        out: list[Emit] = []
        while self._queue:
            piece, start = self._queue[0]
            end = start + len(piece.text)
            if end > upto:
                if not final:
                    break
                piece = piece.cut_chars(max(0, upto - start))
            self._queue.pop(0)
            if piece.text or piece.ids:
                out.append(
                    Emit(role=piece.role, reason=piece.reason, token_ids=tuple(piece.ids), text=piece.text)
                )
        if final:
            self._queue.clear()
        return out


class Nudging(Decoder):
    """Nudging: the aligner writes where the base is unsure (top-1 probability below ``gamma``)."""

    name: ClassVar[str] = "nudging"
    description: ClassVar[str] = (
        "A small aligned model writes the words where the base model is unsure (top-1 probability below "
        "gamma); the base writes the rest. Works across different tokenizers."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (
        RoleSpec("base", "the base model that writes most of the answer (plain prompt format)"),
        RoleSpec("aligner", "the small aligned model that nudges (its chat template)"),
    )
    params_model: ClassVar[type[DecoderParams]] = NudgingParams
    shared_vocab: ClassVar[bool] = False

    @property
    def p(self) -> NudgingParams:
        """The validated parameters."""
        assert isinstance(self.params, NudgingParams)
        return self.params

    def shares_tokenizer(self, base: RoleContext, aligner: RoleContext) -> bool:
        """Whether the two roles' tokenizers are the same (then the decoder works on token ids): the same
        object or model, equal ``vocab_fingerprint`` attributes where both tokenizers have one (the server's
        do), else equal ``get_vocab()`` results."""
        forced = self.p.shared_tokenizer
        if forced is not None:
            if forced and base.vocab_size != aligner.vocab_size:
                raise DecoderError(
                    "shared_tokenizer is true but base and aligner vocabularies differ in size",
                    param="alignment.params.shared_tokenizer",
                )
            return forced
        if base.tokenizer is aligner.tokenizer or base.model == aligner.model:
            return True
        if base.vocab_size != aligner.vocab_size:
            return False
        fa = getattr(base.tokenizer, "vocab_fingerprint", None)
        fb = getattr(aligner.tokenizer, "vocab_fingerprint", None)
        if fa is not None and fb is not None:
            return bool(fa == fb)
        va, vb = getattr(base.tokenizer, "get_vocab", None), getattr(aligner.tokenizer, "get_vocab", None)
        return bool(callable(va) and callable(vb) and va() == vb())

    def run(self, ctx: DecoderContext) -> DecoderRun:
        """Decode one choice (see the module docstring for the rounds)."""
        if ctx.grammar is not None:
            # the roles write natively and across tokenizers: a token-level constraint cannot wrap them
            raise DecoderError(
                "nudging does not support response_format or grammars", param="response_format"
            )
        return _Run(self.p, ctx, self.shares_tokenizer(ctx.roles["base"], ctx.roles["aligner"])).run()


def _engine_sampling(ctx: DecoderContext) -> SamplingOptions:
    """The request's sampling for one engine call (greedy when temperature is 0); a fresh seed per call
    drawn from ``ctx.rng`` so seeded requests are reproducible without repeating one random stream."""
    s = ctx.sampling
    if s.temperature <= 0.0:
        return SamplingOptions()
    seed = int(ctx.rng.integers(0, 2**31 - 1)) if s.seed is not None else None
    return SamplingOptions(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, seed=seed)


def _side_by_side(
    *runs: Generator[list[EngineOp], Any, Any], done: Callable[[int, Any], bool] | None = None
) -> Generator[list[EngineOp], Any, tuple[Any, ...]]:
    """Run sub-steps of one round side by side: each step yields the operations of every run still going
    as one batch (roles on different engines then compute at the same time); returns their results.
    ``done(i, result)`` true for a run that finished stops the others (their results are ``None``)."""
    results: list[Any] = [None] * len(runs)
    asked: dict[int, list[EngineOp]] = {}
    stopped = False

    def advance(i: int, sent: Any) -> None:
        nonlocal stopped
        try:
            asked[i] = runs[i].send(sent)
        except StopIteration as stop:
            results[i] = stop.value
            stopped = stopped or (done is not None and done(i, stop.value))

    for i in range(len(runs)):
        if not stopped:
            advance(i, None)
    while asked and not stopped:
        order, batch = list(asked), [op for ops in asked.values() for op in ops]
        got = yield batch
        at = 0
        for i in order:
            n = len(asked.pop(i))
            advance(i, got[at : at + n])
            at += n
    for i in asked:
        runs[i].close()
    return tuple(results)


def _strip_eos(block: GeneratedBlock, eos: frozenset[int]) -> tuple[list[int], list[StepView], bool]:
    """Tokens before the first end-of-sequence token, their views, and whether the role ended."""
    ids = list(block.token_ids)
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k], list(block.views[:k]), True
    return ids, list(block.views[: len(ids)]), block.finished


class _Run:
    """The state of one nudging choice."""

    def __init__(self, params: NudgingParams, ctx: DecoderContext, shared: bool) -> None:
        self.p = params
        self.ctx = ctx
        self.shared = shared
        b, a = ctx.roles["base"], ctx.roles["aligner"]
        self.base = _Track(b.tokenizer, list(b.prompt_ids), b.eos_token_ids)
        self.al = _Track(a.tokenizer, list(a.prompt_ids), a.eos_token_ids)
        self.out = _Writer(ctx.stop_strings, ctx.max_tokens)
        self.log_gamma = math.log(params.gamma)
        self.gamma = f"{params.gamma:g}"
        self.pending: list[int] = []  # aligner tokens after its context, proposed but not yet output
        prompt_tail = b.prompt_text or self.base.tok.decode(self.base.anchor(b.prompt_ids))
        self.prompt_last_char = prompt_tail[-1:]

    @property
    def greedy(self) -> bool:
        """Whether the request decodes greedily (temperature 0)."""
        return self.ctx.sampling.temperature <= 0.0

    def base_context_at(self, bseg: _Segment, k: int) -> tuple[int, ...]:
        """The base's context at token ``k`` of the block in its tokens (``bseg``): where it is probed there,
        and where it writes from when it takes over there."""
        return (*self.base.ids[: bseg.keep], *bseg.ids[:k])

    def joiner(self, text: str) -> str:
        """A space between the base's prompt and the answer when the prompt ends in a word and the answer
        starts with one: chat templates end in a newline (the aligner writes "Sure"), plain formats in
        "Answer:" (the base expects " Sure"). Only the base's context gets it; it is not output."""
        if self.out.text or not text or text[0].isspace():
            return ""
        return " " if self.prompt_last_char and not self.prompt_last_char.isspace() else ""

    def word_starts(self, text: str, prev: str | None = None) -> list[bool]:
        """For each character of ``text`` (about to follow the output, or the character ``prev``), whether
        a word starts there."""
        if prev is None:
            prev = self.out.text[-1:] if self.out.text else self.prompt_last_char
        flags = []
        for ch in text:
            flags.append(is_word_start(prev, ch))
            prev = ch
        return flags

    def end(self, reason: str) -> DecoderRun:
        """Release what is held back and finish (a finish already decided by the writer wins)."""
        yield from self.out.close(reason)
        assert self.out.finish is not None
        return self.out.finish

    def run(self) -> DecoderRun:
        """The rounds: aligner block, base probe over it, base writing."""
        reason = "nudged: the aligner opens the answer"
        history: list[str] = []
        while True:
            # 1-2. the aligner's block, grown until the base takes over at one of its word starts, the block
            # is full or the aligner ends; the base is asked at each word start as soon as it is known
            ended = False
            rejected: dict[int, str] = {}  # word starts the base declined, with the aligner's reason
            takeover: tuple[int, int, str] | None = None  # (offset, base index, the base's reason)
            lookahead = self.p.aligner_end_lookahead
            probed: dict[tuple[int, ...], StepView] = {}  # the base's views at this round's word starts
            early: _EarlyChunk | None = None
            while True:
                full = ended or len(self.pending) >= self.p.block_tokens
                block, bseg, candidates = self.block_in_base()
                # with the end lookahead a greedy block grows until it is full whatever the base says, so its
                # next token is computed alongside the first probe (the two roles step at the same time)
                grow = lookahead and self.greedy and not full
                grown: tuple[list[int], bool] | None = None
                for rel, k in candidates:
                    if rel in rejected or (ended and lookahead):
                        continue
                    probe = self.probe(bseg, rel, k, block.text, full, probed)
                    if grow and grown is None:
                        decision, grown = yield from _side_by_side(probe, self.aligner_writes())
                    else:
                        decision = yield from probe
                    if decision is None:  # the aligner's next words decide whether the base agrees
                        break
                    took, why = decision
                    if took:
                        takeover = (rel, k, why)
                        break
                    rejected[rel] = why
                if grown is not None:
                    self.pending = self.pending + grown[0]
                    ended = grown[1]
                if full or (takeover is not None and not lookahead):
                    break
                if takeover is not None:
                    # decided again on the complete block: an end inside it ends the answer (the base's view
                    # at the take-over is kept in ``probed``). Greedy: while the aligner completes its block,
                    # the base writes its first chunk from the take-over, used if the decision stands
                    rel, k, _ = takeover
                    takeover = None
                    completing = self.complete_block(ended)
                    want = min(self.p.base_chunk_tokens, self.out.room)
                    if self.greedy and want > 0 and not ended:
                        context = self.base_context_at(bseg, k)
                        writing = self.greedy_chunk(want, True, context, block.text[rel - 1])
                        # the aligner ending makes the chunk moot: it stops too
                        ended, chunk = yield from _side_by_side(completing, writing, done=lambda i, r: i == 0 and r)
                        early = None if chunk is None else _EarlyChunk(context, block.text[rel - 1], chunk)
                    else:
                        ended = yield from completing
                    continue
                if grown is None:
                    new, ended = yield from self.aligner_writes()
                    self.pending = self.pending + new
            if not block.text.strip():
                # nothing (the aligner ended) or a whole block of whitespace: the aligner has no more to say
                return (yield from self.end("stop"))
            probes = [(rel, k, rejected[rel]) for rel, k in candidates if rel in rejected]

            # the aligner's words: up to the take-over, else up to its last word start, else all of it
            next_reason = reason
            if takeover is not None:
                end_rel, end_k = takeover[0], takeover[1]
            elif ended or not candidates:
                end_rel, end_k = len(block.text), len(bseg.ids)
                next_reason = "nudged: the aligner's word goes on"
            else:
                # the next round picks up at the last word start, preferably one where an aligner token
                # starts (its pending tokens stay valid and its context does not end in a lone space)
                at = max(
                    (i for i, (rel, _, _) in enumerate(probes) if block.index_at(rel) is not None),
                    default=len(probes) - 1,
                )
                end_rel, end_k, next_reason = probes[at]
                del probes[at:]
            nudge_text = block.text[:end_rel]
            history.append(nudge_text)
            recent = history[-(self.p.max_repeated_nudges + 1) :]
            if (
                self.p.stop_on_repetition
                and len(recent) > self.p.max_repeated_nudges
                and len(set(recent)) == 1
            ):
                return (yield from self.end("stop"))
            # the first piece starts at the first base token that writes block text (not the joiner or a
            # re-tokenized tail of the context)
            k_first = next(
                (k for k in range(len(bseg.ids)) if (o := bseg.offsets[k + 1]) is None or o > bseg.lead),
                0,
            )
            bounds = [(0, min(k_first, end_k), reason), *probes, (end_rel, end_k, "")]
            for (r0, k0, why), (r1, k1, _) in itertools.pairwise(bounds):
                offs = [None if o is None else max(0, o - bseg.lead - r0) for o in bseg.offsets[k0 : k1 + 1]]
                yield from self.out.add(_Piece("aligner", why, block.text[r0:r1], bseg.ids[k0:k1], offs))
                if self.out.finish is not None:
                    return (yield from self.end("stop"))
            # both roles now hold the aligner's words
            self.base.apply(bseg, end_k)
            ak = block.index_at(end_rel)
            if ak is not None:
                self.al.ids.extend(self.pending[:ak])
                self.pending = self.pending[ak:]
            else:
                self.pending = []
                self.al.apply(self.al.encode(nudge_text))
            if ended and takeover is None:
                return (yield from self.end("stop"))
            if takeover is None:
                reason = next_reason
                continue

            # 3. the base writes until it is unsure at a word start
            result = yield from self.base_writes(takeover[2], early)
            if isinstance(result, Finish):
                return result
            reason = result

    def block_in_base(self) -> tuple[_Segment, _Segment, list[tuple[int, int]]]:
        """The aligner's pending block, the same text in the base's tokens, and the block's decision
        points: ``(offset in the block's text, base token index)`` of each word start after its first word
        that is a base token boundary with text after it."""
        block = self.al.segment(self.pending)
        joiner = self.joiner(block.text)
        if self.shared and not joiner:
            bseg = _Segment(len(self.base.ids), list(self.pending), block.text, 0, list(block.offsets))
        else:
            bseg = self.base.encode(block.text, joiner)
        flags = self.word_starts(block.text)
        candidates: list[tuple[int, int]] = []
        for k in range(1, len(bseg.ids)):
            off = bseg.offsets[k]
            if off is None or off <= bseg.lead:
                continue
            rel = off - bseg.lead
            if rel < len(block.text) and flags[rel] and block.text[:rel].strip():
                candidates.append((rel, k))
        return block, bseg, candidates

    def probe(
        self, bseg: _Segment, rel: int, k: int, text: str, final: bool, probed: dict[tuple[int, ...], StepView]
    ) -> Generator[list[EngineOp], Any, tuple[bool, str] | None]:
        """Ask the base's session at one word start of the block: ``(takes over, why)``, or ``None`` when
        that depends on aligner text not written yet (``final``: the block will not grow). A word start
        asked before in this round (``probed``) is answered from its view: the base's session may have
        written on from there."""
        context = self.base_context_at(bseg, k)
        view = probed.get(context)
        if view is None:
            (view,) = yield [ViewOp("base", context, ViewSpec(top_k=1))]
            probed[context] = view
        top_id, top_lp = view.top()
        prob = math.exp(top_lp)
        agrees = self.agrees(bseg, k, top_id, text[rel:], final)
        if agrees:
            return True, f"base: agrees with the aligner (top-1 p={prob:.2f})"
        if top_lp >= self.log_gamma:
            return True, f"base: top-1 p={prob:.2f} >= {self.gamma}"
        if agrees is None:
            return None
        return False, f"nudged: base top-1 p={prob:.2f} < {self.gamma}"

    def agrees(self, bseg: _Segment, k: int, top_id: int, rest: str, final: bool = True) -> bool | None:
        """Whether the base's top-1 token is the aligner's next token or spells a prefix of its text
        (``None``: the aligner's text so far is a proper prefix of that token's, so its next words decide;
        only when not ``final``)."""
        if top_id in self.base.eos:
            return False
        text, _ = self.base.decode_after(self.base_context_at(bseg, k), [top_id])
        if text and rest.startswith(text):
            return True
        if not final and text.startswith(rest):
            return None
        return final and top_id == bseg.ids[k]

    def complete_block(self, ended: bool) -> Generator[list[EngineOp], Any, bool]:
        """The aligner's block grown until it is full or the aligner ends; returns whether it ended."""
        while not ended and len(self.pending) < self.p.block_tokens:
            new, ended = yield from self.aligner_writes()
            self.pending = self.pending + new
        return ended

    def aligner_writes(self) -> Generator[list[EngineOp], Any, tuple[list[int], bool]]:
        """More of the aligner's block: greedy, one token through the aligner's session (so it writes no
        word the base takes over from); sampling, the rest of the block natively. Returns the new tokens
        and whether the aligner ended."""
        context = (*self.al.ids, *self.pending)
        if self.greedy:
            (view,) = yield [ViewOp("aligner", context, ViewSpec(top_k=1))]
            token = view.top()[0]
            return ([], True) if token in self.al.eos else ([token], False)
        op = GenerateOp(
            "aligner",
            context,
            self.p.block_tokens - len(self.pending),
            want=ViewSpec(),
            sampling=_engine_sampling(self.ctx),
            stop_token_ids=tuple(sorted(self.al.eos)),
        )
        (gen,) = yield [op]
        new, _, ended = _strip_eos(gen, self.al.eos)
        return new, ended

    def base_writes(
        self, reason: str, early: _EarlyChunk | None = None
    ) -> Generator[list[EngineOp] | Emit, Any, Finish | str]:
        """The base writes chunk by chunk; returns why the aligner takes over next, or a Finish. ``early``
        is a first chunk written ahead of the decision; it is used if it starts where the output is."""
        first = True
        while True:
            if self.out.room <= 0:
                return (yield from self.end("length"))
            want = min(self.p.base_chunk_tokens, self.out.room)
            if first and early is not None and early.starts_at(self.base.ids, self.out.text):
                gen = early.first(want)
            elif self.greedy and first:
                gen = yield from self.greedy_chunk(want, first)
            else:
                # sampling, or a greedy base on a run (its previous chunk was kept whole): the engine writes
                # the chunk natively, and a cut drops the rest
                op = GenerateOp(
                    "base",
                    tuple(self.base.ids),
                    want,
                    ViewSpec(top_k=1),
                    _engine_sampling(self.ctx),
                    stop_token_ids=tuple(sorted(self.base.eos)),
                )
                (gen,) = yield [op]
            ids, views, base_ended = _strip_eos(gen, self.base.eos)
            base_ended = base_ended or not gen.token_ids  # an engine that writes nothing has ended
            seg = self.base.segment(ids)
            # decision points: word-start tokens, and the end-of-sequence token if there is one
            checks = self.word_start_tokens(seg)
            eos_view = gen.views[len(ids)] if base_ended and len(gen.views) > len(ids) else None
            cut: int | None = None
            cut_p = 1.0
            for k in checks:
                if first and k == 0:
                    continue
                lp = views[k].top()[1]
                if lp < self.log_gamma:
                    cut, cut_p = k, math.exp(lp)
                    break
            if cut is None and eos_view is not None and not (first and not ids):
                lp = eos_view.top()[1]
                if lp < self.log_gamma:
                    cut, cut_p = len(ids), math.exp(lp)
            n = len(ids) if cut is None else cut
            kept_ids = ids[:n]
            end_off = seg.offsets[n] if n < len(seg.offsets) else len(seg.text)
            kept_text = seg.text[: len(seg.text) if end_off is None else end_off]
            if (
                self.p.stop_on_repetition
                and len(kept_text.split()) >= self.p.repetition_min_words
                and kept_text in self.out.text
            ):
                return (yield from self.end("stop"))
            if kept_ids:
                yield from self.out.add(
                    _Piece("base", reason, kept_text, kept_ids, list(seg.offsets[: n + 1]))
                )
                if self.out.finish is not None:
                    return (yield from self.end("stop"))
                self.base.ids.extend(kept_ids)
                self.follow_with_aligner(kept_text, kept_ids)
            if cut is not None:
                return f"nudged: base top-1 p={cut_p:.2f} < {self.gamma}"
            if base_ended:
                return (yield from self.end("stop"))
            first = False
            reason = f"base: top-1 p >= {self.gamma} at each word start"

    def greedy_chunk(
        self, want: int, first: bool, context: Sequence[int] | None = None, prev: str | None = None
    ) -> Generator[list[EngineOp], Any, GeneratedBlock]:
        """Up to ``want`` greedy base tokens, one :class:`ViewOp` each through the base's session, ending
        at the first token that would cut the chunk (a word start below ``gamma``, not the turn's first
        token) or at an end-of-sequence token. They follow the base's context, or ``context`` with the
        output ending in the character ``prev`` (a chunk written ahead of the decision that leads there).

        Greedy tokens are the views' top-1 tokens, so this writes what a native chunk would, but stops
        where the base hands over instead of generating tokens that are thrown away: the first chunk of a
        turn, where the hand-over usually comes within a few tokens (1-4 on the embedded default's Gemma-3
        base), is written this way; later chunks of a run natively (see :meth:`base_writes`).
        """
        base_context = tuple(self.base.ids if context is None else context)
        ids: list[int] = []
        views: list[StepView] = []
        while len(ids) < want:
            (view,) = yield [ViewOp("base", (*base_context, *ids), ViewSpec(top_k=1))]
            token, lp = view.top()
            ids.append(token)
            views.append(view)
            if token in self.base.eos:
                return GeneratedBlock(token_ids=ids, views=views, finished=True)
            cuttable = lp < self.log_gamma and not (first and len(ids) == 1)
            if cuttable and len(ids) - 1 in self.word_start_tokens(self.base.segment(ids, base_context), prev):
                break
        return GeneratedBlock(token_ids=ids, views=views, finished=False)

    def word_start_tokens(self, seg: _Segment, prev: str | None = None) -> list[int]:
        """Indexes of the tokens of ``seg`` (about to follow the output, or the character ``prev``) that
        start a word."""
        flags = self.word_starts(seg.text, prev)
        return [
            k for k in range(len(seg.ids)) if (o := seg.offsets[k]) is not None and o < len(seg.text) and flags[o]
        ]

    def follow_with_aligner(self, text: str, base_ids: Sequence[int]) -> None:
        """The output grew by ``text`` (the base's ``base_ids``): bring the aligner's context along, keeping
        its pending tokens when they spell exactly that text up to one of their token boundaries."""
        if self.shared:
            n = len(base_ids)
            if self.pending[:n] == list(base_ids):
                self.pending = self.pending[n:]
            else:
                self.pending = []
            self.al.ids.extend(base_ids)
            return
        if self.pending:
            seg = self.al.segment(self.pending)
            k = seg.index_at(len(text)) if seg.text.startswith(text) else None
            if k is not None:
                self.al.ids.extend(self.pending[:k])
                self.pending = self.pending[k:]
                return
        self.pending = []
        self.al.apply(self.al.encode(text))
