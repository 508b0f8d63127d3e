"""ASAp: adaptive sampling with approximate expected futures (Park et al., "Grammar-Aligned Decoding").

Sampling under a grammar by masking (plain constrained decoding) draws from a distorted distribution: it
renormalises each step locally, so prefixes whose continuations are mostly ungrammatical get too much mass.
The target is the model's distribution conditioned on grammaticality,
``Q(w) ∝ P(w)·[w ∈ L]``, whose exact next-token rule is ``Q(t | w) ∝ P(t | w)·EFG(w t)`` with
``EFG(w) = Σ_t P(t | w)·EFG(w t)`` (tokens the grammar forbids count 0; a completed string counts 1).

ASAp keeps, per (model, grammar, prompt), a trie of the prefixes earlier samples went through. Each node
holds the raw probability of its token (unmasked, T=1) and an over-approximation ``θ`` of its EFG,
initialised to 1. A step samples from ``P(t | w)·θ(w t)`` over the allowed tokens; when a sample is over,
``θ`` is recomputed bottom-up along its path: ``θ(w) = Σ_{t allowed} P(t | w)·θ(w t)``, with unexplored
allowed tokens still at 1. ``θ`` only decreases and converges to the true EFG on the prefixes sampling
visits, so the sample distribution converges to ``Q`` as samples accumulate (exactly ``Q`` only with pure
sampling: temperature 1, no top-k/top-p/min-p).

Differences from the reference implementation (ebmoon/transformers-GAD), none changing the math:

* Vectorised. A node stores the mass of its allowed tokens (one numpy reduction) and a running
  *deficit* ``Σ_children P(c)·(1 - θ(c))``, so ``θ = mass - deficit`` is updated in O(1) per path node;
  the reference creates a child object for every allowed token at every step and loops over them in
  Python (20x slower than plain constrained decoding on JSON). Children exist only where a sample went.
* The reference reweights whatever scores the HF logits-processor chain hands it (after temperature or
  other warpers if configured); ASAp needs the raw distribution, which the contract's views guarantee.
* Bounded memory: tries live in a :class:`TrieStore` with an LRU over tries and a node budget, so they
  persist across the ``n`` choices of a request and across requests.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from alignd.decoders.grammar.backends.base import Matcher
from alignd.decoders.grammar.constraint import MaskConstraint

__all__ = ["AsapConstraint", "AsapTrie", "TrieNode", "TrieStore", "trie_key"]

DEFAULT_MAX_NODES = 500_000
DEFAULT_MAX_TRIES = 4096


class TrieNode:
    """One prefix: its token's raw probability, its EFG estimate ``theta`` and its explored children."""

    __slots__ = ("_ids", "_log_theta", "children", "deficit", "mass", "p", "theta")

    def __init__(self, p: float | None) -> None:
        self.p = p  # raw P(token | parent prefix); None when the parent's view was not given
        self.theta = 1.0
        self.mass: float | None = None  # Σ P(t | this prefix) over allowed t, once seen
        self.deficit = 0.0  # Σ over children with known p of p·(1 - θ)
        self.children: dict[int, TrieNode] = {}
        self._ids: np.ndarray | None = None
        self._log_theta: np.ndarray | None = None

    def child_log_theta(self) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the explored children whose ``θ < 1`` and their ``log θ`` (cached)."""
        if self._ids is None:
            items = [(t, c.theta) for t, c in self.children.items() if c.theta < 1.0]
            self._ids = np.fromiter((t for t, _ in items), dtype=np.int64, count=len(items))
            with np.errstate(divide="ignore"):
                self._log_theta = np.log(
                    np.fromiter((th for _, th in items), dtype=np.float64, count=len(items))
                )
        assert self._log_theta is not None
        return self._ids, self._log_theta

    def invalidate(self) -> None:
        """Forget the cached child arrays after a child's ``θ`` changed."""
        self._ids = None
        self._log_theta = None


class AsapTrie:
    """The samples drawn so far for one (model, grammar, prompt)."""

    def __init__(self) -> None:
        self.root = TrieNode(p=1.0)
        self.num_nodes = 1
        self.num_samples = 0
        self._lock = threading.Lock()

    def observe(self, node: TrieNode, allowed: np.ndarray, logprobs: np.ndarray) -> None:
        """Record the mass of the allowed tokens at ``node`` (first visit only: the model is fixed)."""
        if node.mass is None:
            lp = np.asarray(logprobs, dtype=np.float64)[np.asarray(allowed, dtype=bool)]
            node.mass = float(np.exp(lp[np.isfinite(lp)]).sum()) if lp.size else 0.0

    def child(self, node: TrieNode, token_id: int, p: float | None) -> TrieNode:
        """The child of ``node`` for ``token_id``, created with raw probability ``p`` if new."""
        c = node.children.get(token_id)
        if c is None:
            with self._lock:
                c = node.children.get(token_id)
                if c is None:
                    c = TrieNode(p)
                    node.children[token_id] = c
                    self.num_nodes += 1
        elif c.p is None and p is not None:
            c.p = p
            node.deficit += p * (1.0 - c.theta)
        return c

    def backpropagate(self, path: Sequence[TrieNode]) -> None:
        """Recompute ``θ`` bottom-up along a finished sample's path (``path[0]`` is the root)."""
        with self._lock:
            self.num_samples += 1
            for i in range(len(path) - 1, -1, -1):
                node = path[i]
                old = node.theta
                if node.mass is not None:
                    node.theta = min(old, max(0.0, node.mass - node.deficit))
                if i > 0 and node.theta != old:
                    parent = path[i - 1]
                    if node.p is not None:
                        parent.deficit += node.p * (old - node.theta)
                    parent.invalidate()

    def log_weights(self, node: TrieNode, vocab_size: int) -> np.ndarray:
        """``log θ`` of every token's child of ``node`` (0 where unexplored or still 1)."""
        out = np.zeros(vocab_size, dtype=np.float64)
        ids, log_theta = node.child_log_theta()
        if ids.size:
            out[ids] = log_theta
        return out


class TrieStore:
    """ASAp tries by key, bounded: least recently used tries are dropped past ``max_tries`` or when all
    tries together hold more than ``max_nodes`` nodes. Share one per server (or per decoder instance)."""

    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES, max_tries: int = DEFAULT_MAX_TRIES) -> None:
        self.max_nodes = max_nodes
        self.max_tries = max_tries
        self._tries: OrderedDict[Hashable, AsapTrie] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tries)

    def keys(self) -> list[Hashable]:
        """The keys of the tries held, least recently used first."""
        return list(self._tries)

    def get(self, key: Hashable) -> AsapTrie:
        """The trie for ``key``, created if absent; marks it most recently used."""
        with self._lock:
            trie = self._tries.get(key)
            if trie is None:
                trie = AsapTrie()
                self._tries[key] = trie
            self._tries.move_to_end(key)
            self._evict(keep=key)
            return trie

    def peek(self, key: Hashable) -> AsapTrie | None:
        """The trie for ``key`` if held, without touching the LRU order."""
        return self._tries.get(key)

    def total_nodes(self) -> int:
        """Nodes held by all tries."""
        return sum(t.num_nodes for t in self._tries.values())

    def enforce_budget(self) -> None:
        """Drop least recently used tries until the bounds hold (the most recent one is always kept)."""
        with self._lock:
            if self._tries:
                self._evict(keep=next(reversed(self._tries)))

    def _evict(self, keep: Hashable) -> None:
        total = self.total_nodes()
        while len(self._tries) > 1 and (len(self._tries) > self.max_tries or total > self.max_nodes):
            key, trie = next(iter(self._tries.items()))
            if key == keep:
                self._tries.move_to_end(key)
                continue
            del self._tries[key]
            total -= trie.num_nodes


def trie_key(model: str, grammar_key: str, prompt_ids: Sequence[int]) -> str:
    """The store key of a (model, grammar, prompt): a digest, so long prompts do not bloat the store."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\x00")
    h.update(grammar_key.encode())
    h.update(b"\x00")
    h.update(np.asarray(list(prompt_ids), dtype=np.int64).tobytes())
    return h.hexdigest()


class AsapConstraint(MaskConstraint):
    """A grammar constraint that also reweights allowed tokens by their learnt EFG and, when the choice
    is over (:meth:`finish`), folds the sample into its trie.

    Callers must call :meth:`log_weights` at every position, with the raw distribution covering at least
    the allowed tokens, before :meth:`advance`; positions where they do not are not learnt from (the
    estimate stays a valid over-approximation).
    """

    def __init__(
        self,
        matcher: Matcher,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        trie: AsapTrie,
        store: TrieStore | None = None,
    ) -> None:
        super().__init__(matcher, vocab_size, eos_token_ids)
        self.trie = trie
        self._store = store
        self._path: list[TrieNode] = [trie.root]
        self._logprobs: np.ndarray | None = None
        self._finished = False

    def log_weights(self, allowed: np.ndarray, logprobs: np.ndarray) -> np.ndarray | None:
        """``log θ`` of each token's continuation of the current prefix (0 where unexplored)."""
        node = self._path[-1]
        self.trie.observe(node, allowed, logprobs)
        self._logprobs = logprobs
        return self.trie.log_weights(node, self.vocab_size)

    def is_terminated(self) -> bool:
        """Whether end-of-sequence was accepted.

        Unlike plain masking, a complete text whose only continuation is EOS is not terminated yet: the
        caller must take one more step there so the trie learns P(EOS | text), which is that prefix's
        expected future grammaticality (skipping it would weight every complete text as if the model
        always ended it).
        """
        return self._matcher.is_stopped()

    def advance(self, token_id: int) -> None:
        """Accept the chosen token and step down the trie."""
        super().advance(token_id)
        p = None
        if self._logprobs is not None:
            lp = float(self._logprobs[token_id])
            p = float(np.exp(lp)) if np.isfinite(lp) else None
        self._logprobs = None
        self._path.append(self.trie.child(self._path[-1], int(token_id), p))

    def rollback(self, num_tokens: int) -> None:
        """Undo accepted tokens; the trie keeps what it learnt about them (it is still true)."""
        super().rollback(num_tokens)
        if num_tokens:
            del self._path[-num_tokens:]
        self._logprobs = None

    def finish(self) -> None:
        """Fold this sample into the trie (once)."""
        if self._finished:
            return
        self._finished = True
        self.trie.backpropagate(self._path)
        if self._store is not None:
            self._store.enforce_budget()
