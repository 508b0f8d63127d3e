"""URIAL: in-context alignment of a base model (Lin et al., "The Unlocking Spell on Base LLMs").

No second model: the base model's prompt is built by :func:`alignd.decoders.prompts.build_prompt` in the
``urial`` format (a system prompt and constant stylistic examples from ``data/urial/urial.json``, then the
query), and the model writes natively, in blocks of ``block_tokens`` (:class:`GenerateOp`), with the
request's own sampling settings. The answer ends where a new ``# Query`` header would start (the example
layout the model imitates), at the model's end-of-sequence token, at a stop string, or at ``max_tokens``;
the closing code fence of the answer is not part of the output.

The server builds the ``base`` role's prompt in the format named by :attr:`URIAL.default_prompt_formats`
unless the recipe names another. URIAL also works as the base's prompt format inside other decoders
(nudging's base, for example): that is just the prompt format, without this decoder.

With a grammar constraint the blocks are verified token by token against the grammar (the generic
draft-and-verify of :mod:`alignd.decoders.token_level`, with the base's full view).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import Field

from alignd.decoders.contract import DecoderContext, DecoderParams, RoleSpec, StepView, ViewSpec
from alignd.decoders.prompts import format_stop_strings
from alignd.decoders.token_level import Scores, SpeculativeParams, Step, TokenLevelDecoder, token_text

__all__ = ["URIAL", "URIAL_STOP_STRINGS", "URIALParams"]

URIAL_STOP_STRINGS: tuple[str, ...] = (
    # the closing fence plus the next header, so that the fence is cut together with the header
    "\n```\n\n# Query",
    "\n```\n# Query",
    *format_stop_strings("urial"),
)
_CLOSING_FENCE = re.compile(r"\s*```\s*$")


class URIALParams(DecoderParams):
    """Parameters of URIAL."""

    block_tokens: int = Field(
        default=16, ge=1, le=512, description="How many tokens the base writes per engine call."
    )
    stop_at_query: bool = Field(
        default=True, description="End the answer where the model starts a new '# Query' header."
    )


class URIAL(TokenLevelDecoder):
    """A base model aligned in context by a URIAL prompt, writing natively."""

    name: ClassVar[str] = "urial"
    description: ClassVar[str] = (
        "URIAL (Lin et al.): a base model prompted with a system prompt and constant stylistic examples, "
        "writing natively; stops before a new '# Query' header."
    )
    roles: ClassVar[tuple[RoleSpec, ...]] = (RoleSpec("base", "The base model (prompt format 'urial')."),)
    params_model: ClassVar[type[URIALParams]] = URIALParams
    shared_vocab: ClassVar[bool] = False
    default_prompt_formats: ClassVar[dict[str, str]] = {"base": "urial"}
    """The prompt format the server should give each role unless the recipe names one."""
    params: URIALParams

    def view_specs(self, ctx: DecoderContext) -> dict[str, ViewSpec]:
        """The base's full view (read only when a grammar makes the driver verify the blocks)."""
        return {"base": ViewSpec(full=True)}

    def speculative_params(self, ctx: DecoderContext) -> SpeculativeParams:
        """Always in blocks written by the base."""
        return SpeculativeParams(draft_role="base", block_size=self.params.block_tokens)

    def draft_is_target(self, ctx: DecoderContext) -> bool:
        """The output *is* the base's native generation."""
        return True

    def stop_strings(self, ctx: DecoderContext) -> tuple[str, ...]:
        """The request's stop strings, plus the next query header."""
        extra = URIAL_STOP_STRINGS if self.params.stop_at_query else ()
        return tuple(ctx.stop_strings) + extra

    def tail_to_drop(self, ctx: DecoderContext) -> re.Pattern[str] | None:
        """A closing code fence at the very end of the answer."""
        return _CLOSING_FENCE

    def scores(self, step: Step, views: Mapping[str, StepView], extra: Sequence[Any]) -> Scores:
        """The base's own distribution (used only under a grammar)."""
        ctx = step.ctx
        return Scores(
            views["base"].dense(step.vocab_size),
            explain=lambda token: f"urial: base wrote {token_text(ctx, 'base', token)!r}",
        )
