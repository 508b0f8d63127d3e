"""The naive gateway the speed table compares against: what research code that orchestrates separate vLLM
servers over HTTP does. Every step resubmits each role's prompt plus the output so far with ``max_tokens=1``
and ``logprobs=20``, merges the returned top-20 log-probabilities the way the recipe's decoder would, and
appends the chosen token. It runs against the same engines (the alignd server's plain models)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from bench.configs import RecipeInfo

if TYPE_CHECKING:
    from bench.scenarios import SuiteBench

__all__ = ["merge_top", "naive_request"]

TOP = 20


def _top(choice: Any) -> dict[int, float]:
    tops = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else {}
    return {int(k.split(":", 1)[1]): v for k, v in tops.items()}


def merge_top(decoder: str, views: dict[str, dict[int, float]]) -> int:
    """The token a decoder would choose from top-20 views only (the naive gateway's approximation)."""
    def get(role: str, t: int) -> float:
        v = views[role]
        return v.get(t, min(v.values()) if v else -30.0)

    if decoder == "contrastive":
        e = views["expert"]
        best = max(e.values())
        head = [t for t, lp in e.items() if lp >= best + math.log(0.1)]
        return max(head, key=lambda t: e[t] - 0.5 * get("amateur", t))
    if decoder == "logit_arithmetic":
        b = views["base"]
        return max(b, key=lambda t: b[t] + 1.5 * (get("aligned", t) - get("reference", t)))
    if decoder == "args":
        b = views["base"]
        cands = sorted(b, key=lambda t: -b[t])[:10]
        return max(cands, key=lambda t: b[t] + get("aligned", t) - get("reference", t))
    raise ValueError(f"no naive merge for decoder {decoder!r}")


async def naive_request(bench: SuiteBench, recipe: RecipeInfo, instruction: str, n: int) -> list[int]:
    """``n`` tokens of ``recipe`` decoded by resubmission; returns them."""
    roles = recipe.lockstep_roles
    contexts = {r: list(await bench.role_ids(m, s, instruction)) for r, (m, s) in roles.items()}
    out: list[int] = []

    async def step(role: str) -> dict[int, float]:
        res = await bench.client.completions.create(
            model=roles[role][0], prompt=contexts[role], max_tokens=1, temperature=0.0, logprobs=TOP,
            extra_body={"return_tokens_as_token_ids": True},
        )
        return _top(res.choices[0])

    for _ in range(n):
        names = list(roles)
        views = dict(zip(names, await asyncio.gather(*(step(r) for r in names))))
        token = merge_top(recipe.decoder, views)
        out.append(token)
        for ctx in contexts.values():
            ctx.append(token)
    return out
