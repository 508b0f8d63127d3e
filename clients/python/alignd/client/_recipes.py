"""Recipe builders: a decoder, the models playing its roles, and its parameters, as typed objects.

Each builder serialises to the ``alignment`` body field with :meth:`BaseRecipe.to_alignment`::

    Nudging(base="tiny-base", aligner="tiny-chat", gamma=0.3).to_alignment()
    == {"decoder": "nudging", "roles": {"base": "tiny-base", "aligner": "tiny-chat"},
        "params": {"gamma": 0.3}}

Parameter names are the server decoders' own. Only parameters given explicitly are sent, so the server's
defaults (which the builders' defaults mirror) apply to the rest; keyword arguments a builder does not
declare are passed through in ``params`` unchanged, for decoder options newer than this SDK.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ARGS",
    "URIAL",
    "BaseRecipe",
    "Contrastive",
    "GrammarAligned",
    "LogitArithmetic",
    "Nudging",
    "Recipe",
    "Role",
    "RoleLike",
    "Speculative",
]


class Role(BaseModel):
    """A model playing a role, optionally under its own system prompt or prompt format.

    ``Role("tiny-chat", system_prompt="Answer rudely.")`` lets one model play two roles differently,
    e.g. both sides of contrastive decoding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    system_prompt: str | None = None
    prompt_format: str | None = None

    def __init__(
        self, model: str, system_prompt: str | None = None, prompt_format: str | None = None, **data: Any
    ) -> None:
        super().__init__(model=model, system_prompt=system_prompt, prompt_format=prompt_format, **data)

    def to_wire(self) -> str | dict[str, str]:
        """The model name alone when there is no variant, else ``{"model", "system_prompt", ...}``."""
        if self.system_prompt is None and self.prompt_format is None:
            return self.model
        return self.model_dump(exclude_none=True)


RoleLike = str | Role


class Speculative(BaseModel):
    """Speculative draft-and-verify for a token-level decoder (lossless: same output, faster).

    ``draft_role`` writes blocks of ``block_size`` tokens natively and the other roles verify them; by
    default the decoder's usual winner drafts (the base in nudging, the expert in contrastive decoding).
    ``method="ngram"`` drafts by prompt lookup instead (the tokens that followed the last
    ``prompt_lookup_min``-``prompt_lookup_max`` tokens earlier in the prompt and output): no model writes the
    draft, which pays where the answer repeats its input (copying, correcting, editing).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["draft_role", "ngram"] | None = None
    draft_role: str | None = None
    block_size: int = 8
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None


def _role_to_wire(value: RoleLike | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(value, Role):
        return value.to_wire()
    if isinstance(value, Mapping):
        return Role(**value).to_wire()
    return value


_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "choice", "json_object")


class BaseRecipe(BaseModel, ABC):
    """Anything that can be sent as a request's ``alignment`` field."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    @abstractmethod
    def to_alignment(self, *, trace: bool | None = None) -> dict[str, Any]:
        """The ``alignment`` body field: ``{"decoder", "roles", "params"}`` (and ``trace`` when given)."""

    def default_model(self) -> str:
        """The model name put in a request's ``model`` field when only a recipe is given: the first role's."""
        roles = self.to_alignment()["roles"]
        first = next(iter(roles.values()), None)
        if first is None:
            raise ValueError("a recipe needs at least one role")
        return first if isinstance(first, str) else str(first["model"])


class Recipe(BaseRecipe):
    """Any decoder by name: ``Recipe("nudging", {"base": "m1", "aligner": "m2"}, {"gamma": 0.3})``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    decoder: str
    roles: dict[str, str | Role]
    params: dict[str, Any] = Field(default_factory=dict)

    def __init__(
        self,
        decoder: str,
        roles: Mapping[str, RoleLike | Mapping[str, Any]],
        params: Mapping[str, Any] | None = None,
    ) -> None:
        parsed = {k: Role(**v) if isinstance(v, Mapping) else v for k, v in roles.items()}
        BaseModel.__init__(self, decoder=decoder, roles=parsed, params=dict(params or {}))

    @classmethod
    def from_alignment(cls, alignment: Mapping[str, Any]) -> Recipe:
        """The recipe in an ``alignment`` body field (its ``trace`` flag is not part of a recipe)."""
        return cls(str(alignment["decoder"]), alignment.get("roles") or {}, alignment.get("params") or {})

    def to_alignment(self, *, trace: bool | None = None) -> dict[str, Any]:
        """See :meth:`BaseRecipe.to_alignment`."""
        out: dict[str, Any] = {
            "decoder": self.decoder,
            "roles": {k: _role_to_wire(v) for k, v in self.roles.items()},
            "params": dict(self.params),
        }
        if trace is not None:
            out["trace"] = trace
        return out


class _Builder(BaseRecipe):
    """A recipe for one decoder: role fields (``str | Role``) and parameter fields."""

    decoder: ClassVar[str]
    role_names: ClassVar[tuple[str, ...]]

    def to_alignment(self, *, trace: bool | None = None) -> dict[str, Any]:
        """See :meth:`BaseRecipe.to_alignment`."""
        roles = {
            name: _role_to_wire(getattr(self, name))
            for name in self.role_names
            if getattr(self, name) is not None
        }
        declared = self.model_dump(by_alias=True, exclude_unset=True, exclude=set(self.role_names))
        params = {k: v for k, v in declared.items() if k not in (self.model_extra or {})}
        params.update(self.model_extra or {})
        out: dict[str, Any] = {"decoder": self.decoder, "roles": roles, "params": params}
        if trace is not None:
            out["trace"] = trace
        return out


class Nudging(_Builder):
    """Nudging: the base model writes; where it is unsure, the small aligned model takes over.

    Roles: ``base`` writes while its top-1 probability at word starts is at least ``gamma`` (also
    accepted as ``threshold=``); below it, ``aligner`` proposes the next words (``block_tokens`` per
    round). Works across tokenizers (``shared_tokenizer=None`` detects a shared one). The output stops
    early when it starts repeating itself (``stop_on_repetition``, ``repetition_min_words``,
    ``max_repeated_nudges``). ``aligner_end_lookahead`` completes the aligner's block before the base
    takes over, so that an end inside it ends the answer (false: faster, the base may write on).
    """

    decoder: ClassVar[str] = "nudging"
    role_names: ClassVar[tuple[str, ...]] = ("base", "aligner")

    base: RoleLike
    aligner: RoleLike
    gamma: float = Field(0.4, validation_alias=AliasChoices("gamma", "threshold"))
    block_tokens: int = 16
    base_chunk_tokens: int = 16
    shared_tokenizer: bool | None = None
    stop_on_repetition: bool = True
    repetition_min_words: int = 6
    max_repeated_nudges: int = 3
    aligner_end_lookahead: bool = True


class ARGS(_Builder):
    """ARGS, alignment as reward-guided search: among the base model's top ``k`` tokens, choose by
    ``log p_base + w * reward(prefix + token)``.

    ``rewards`` lists the reward sources, combined by ``combine`` (``"sum"`` or ``"log_sigmoid"``):
    ``{"kind": "model"}`` (the ``reward`` role, the default), ``{"kind": "implicit"}`` (the ``aligned``
    and ``reference`` roles), ``{"kind": "rules", "include": [...], "avoid": [...], ...}``; each may carry
    a ``weight`` and a ``reference`` value. ``temperature`` applies when the request samples (``None``:
    the request's own). ``weight=`` is accepted for ``w``.
    """

    decoder: ClassVar[str] = "args"
    role_names: ClassVar[tuple[str, ...]] = ("base", "reward", "aligned", "reference")

    base: RoleLike
    reward: RoleLike | None = None
    aligned: RoleLike | None = None
    reference: RoleLike | None = None
    k: int = 10
    w: float = Field(1.0, validation_alias=AliasChoices("w", "weight"))
    temperature: float | None = 0.7
    rewards: list[dict[str, Any]] | None = None
    combine: Literal["sum", "log_sigmoid"] = "sum"
    speculative: Speculative | None = None


class Contrastive(_Builder):
    """Contrastive decoding: prefer tokens the ``expert`` likes more than the ``amateur`` does.

    Scores ``log p_expert - beta * log p_amateur / tau`` over the expert's plausible tokens (those with
    ``p >= alpha * max p``). ``formula="acd"`` is Adversarial Contrastive Decoding: one model as both
    roles, the amateur under an adversarial system prompt (``Role(model, system_prompt=...)``), weighted
    by ``acd_alpha``. ``amateur_context="last_token"`` shows the amateur only the last prompt token.
    """

    decoder: ClassVar[str] = "contrastive"
    role_names: ClassVar[tuple[str, ...]] = ("expert", "amateur")

    expert: RoleLike
    amateur: RoleLike
    alpha: float = 0.1
    beta: float = 1.0
    tau: float = 0.5
    amateur_context: Literal["full", "last_token"] = "full"
    formula: Literal["cd", "acd"] = "cd"
    acd_alpha: float = 0.5
    speculative: Speculative | None = None


class LogitArithmetic(_Builder):
    """Logit arithmetic (proxy tuning, DExperts): ``base + lam * (aligned - reference)`` in log space.

    ``lam`` (sent as the decoder's ``lambda``): 0 is the base alone, 1 proxy-tuning, above 1
    extrapolates, below 0 steers away. All three models share one vocabulary.
    """

    decoder: ClassVar[str] = "logit_arithmetic"
    role_names: ClassVar[tuple[str, ...]] = ("base", "aligned", "reference")

    base: RoleLike
    aligned: RoleLike
    reference: RoleLike
    lam: float = Field(1.0, alias="lambda")
    speculative: Speculative | None = None


class GrammarAligned(_Builder):
    """Grammar-aligned decoding: output that matches a JSON schema, regex, EBNF grammar or list of choices.

    Give at most one of ``json_schema``, ``regex``, ``ebnf`` (also accepted as ``grammar=``), ``choice``
    or ``json_object=True``; with none, the request's ``response_format`` supplies the grammar.
    ``mode="constrained"`` masks and renormalises; ``"asap"`` also reweights by the learnt expected
    future grammaticality, so repeated samples converge to the model's own distribution given the
    grammar (exactly so with ``pure_sampling=True``).
    """

    decoder: ClassVar[str] = "grammar"
    role_names: ClassVar[tuple[str, ...]] = ("base",)

    base: RoleLike
    mode: Literal["constrained", "asap"] = "constrained"
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    ebnf: str | None = Field(None, validation_alias=AliasChoices("ebnf", "grammar"))
    choice: list[str] | None = None
    json_object: bool = False
    backend: Literal["xgrammar", "llguidance"] = "xgrammar"
    pure_sampling: bool = False

    @model_validator(mode="after")
    def _at_most_one_grammar(self) -> GrammarAligned:
        given = [n for n in _GRAMMAR_FIELDS if getattr(self, n) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one grammar, got {', '.join(given)}")
        return self


class URIAL(_Builder):
    """URIAL: a base model aligned in context by a system prompt and stylistic examples, writing natively.

    ``block_tokens`` is how many tokens the base writes per engine call; ``stop_at_query`` ends the
    answer where the model starts a new ``# Query`` header.
    """

    decoder: ClassVar[str] = "urial"
    role_names: ClassVar[tuple[str, ...]] = ("base",)

    base: RoleLike
    block_tokens: int = 16
    stop_at_query: bool = True
