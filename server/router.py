"""Resolves a request's ``model`` (and ``alignment`` body field) to a plain hosted model or a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from alignd.server.api.errors import BadRequest, NotFound
from alignd.server.api.protocol import AlignmentRoleSpec, AlignmentSpec
from alignd.server.models import HostedModel, ModelPool
from alignd.server.settings import RoleBinding

__all__ = ["BoundRole", "PlainTarget", "RecipeTarget", "Router"]


@dataclass
class PlainTarget:
    """A hosted model decoding natively."""

    model: HostedModel


@dataclass
class BoundRole:
    """A decoder role bound to a hosted model, with its prompt variant."""

    role: str
    model: HostedModel
    system_prompt: str | None = None
    prompt_format: str | None = None


@dataclass
class RecipeTarget:
    """A decoder with its models and validated parameters."""

    name: str
    decoder: Any  # alignd.decoders.contract.Decoder
    roles: dict[str, BoundRole]
    trace: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_model(self) -> HostedModel:
        """The model whose tokenizer detokenizes and counts the output."""
        return self.roles[self.decoder.output_role()].model


def _bad_params(exc: ValidationError, prefix: str) -> BadRequest:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    param = f"{prefix}.{loc}" if loc else prefix
    return BadRequest(f"{param}: {first['msg']}", param)


class Router:
    """Maps model names to targets; named recipes come from the config, others from the request body."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self._decoders: dict[str, Any] = {}  # recipe name -> decoder instance (keeps per-recipe state)

    def resolve(self, model: str, alignment: AlignmentSpec | None) -> PlainTarget | RecipeTarget:
        """The target of a request; 404 for an unknown model, 400 for a bad recipe."""
        recipes = self.pool.settings.recipes
        trace = bool(alignment and alignment.trace)
        if model in recipes:
            recipe = recipes[model]
            if alignment and (alignment.decoder or alignment.roles):
                raise BadRequest(
                    f"model {model!r} is a recipe; send `alignment.params`/`trace` only, or name a plain model",
                    "alignment",
                )
            params = {**recipe.params, **(alignment.params if alignment else {})}
            return self._build(model, recipe.decoder, recipe.roles, params, trace, cache=not (alignment and alignment.params))
        if alignment is not None and alignment.decoder:
            roles: dict[str, RoleBinding] = {}
            for role, spec in alignment.roles.items():
                spec = AlignmentRoleSpec(model=spec) if isinstance(spec, str) else spec
                roles[role] = RoleBinding(**spec.model_dump())
            if not roles:
                # A recipe in the body with no roles binds the request's model to every role.
                roles = {"*": RoleBinding(model=model)}
            return self._build("alignment", alignment.decoder, roles, alignment.params, trace, cache=False)
        if alignment is not None and (alignment.roles or alignment.params):
            raise BadRequest("alignment.decoder is required", "alignment.decoder")
        if model not in self.pool.settings.models:
            raise NotFound(f"The model `{model}` does not exist.", "model")
        return PlainTarget(self.pool.get(model))

    def _build(
        self,
        name: str,
        decoder_name: str,
        bindings: dict[str, RoleBinding],
        params: dict[str, Any],
        trace: bool,
        cache: bool,
    ) -> RecipeTarget:
        from alignd.decoders.contract import DecoderError
        from alignd.decoders.registry import get_decoder_class

        try:
            cls = get_decoder_class(decoder_name)
        except DecoderError as exc:
            raise BadRequest(str(exc), "alignment.decoder") from None
        if "*" in bindings:
            only = bindings.pop("*")
            bindings = {r.name: only for r in cls.roles if not r.optional}
        known = {r.name for r in cls.roles}
        for role in bindings:
            if role not in known:
                raise BadRequest(
                    f"decoder {decoder_name!r} has no role {role!r} (roles: {', '.join(sorted(known))})",
                    f"alignment.roles.{role}",
                )
        for spec in cls.roles:
            if not spec.optional and spec.name not in bindings:
                raise BadRequest(f"decoder {decoder_name!r} needs role {spec.name!r}", f"alignment.roles.{spec.name}")
        roles: dict[str, BoundRole] = {}
        for spec in cls.roles:
            binding = bindings.get(spec.name)
            if binding is None:
                continue
            if binding.model not in self.pool.settings.models:
                raise BadRequest(
                    f"role {spec.name!r} names unknown model {binding.model!r}", f"alignment.roles.{spec.name}"
                )
            hosted = self.pool.get(binding.model, f"alignment.roles.{spec.name}")
            if hosted.settings.task != spec.task:
                raise BadRequest(
                    f"role {spec.name!r} needs a {spec.task} model; {binding.model!r} is a {hosted.settings.task} model",
                    f"alignment.roles.{spec.name}",
                )
            default_format = getattr(cls, "default_prompt_formats", {}).get(spec.name)
            roles[spec.name] = BoundRole(
                spec.name, hosted, binding.system_prompt, binding.prompt_format or default_format
            )
        if cls.shared_vocab:
            generating = [r for r in roles.values() if r.model.settings.task == "generate"]
            signatures = {r.model.vocab_signature for r in generating}
            if len(signatures) > 1:
                names = ", ".join(f"{r.role}={r.model.name}" for r in generating)
                raise BadRequest(
                    f"decoder {decoder_name!r} merges token distributions and needs one shared vocabulary; "
                    f"these models' vocabularies differ: {names}",
                    "alignment.roles",
                )
        decoder = self._decoders.get(name) if cache else None
        if decoder is None:
            try:
                decoder = cls(cls.parse_params(params))
            except ValidationError as exc:
                raise _bad_params(exc, "alignment.params") from None
            except DecoderError as exc:
                raise BadRequest(str(exc), exc.param or "alignment.params") from None
            if cache:
                self._decoders[name] = decoder
        return RecipeTarget(name, decoder, roles, trace)
