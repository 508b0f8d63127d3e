"""The measurements behind each row of the speed table, run against one started alignd server.

Every ratio is measured side by side in one run: a composite request, then the floor of the same request
(the native vLLM decoding of the forward passes the method cannot avoid, with the same prompts and token
counts, ``ignore_eos``), interleaved prompt by prompt so that a busy machine weighs on both alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from bench import load
from bench.configs import RecipeInfo, Suite
from bench.procs import MemorySampler, cpu_seconds

__all__ = ["Ratio", "SuiteBench", "percentile"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Ratio:
    """Composite time against its floor (or another baseline) over the same requests."""

    seconds: float
    baseline_seconds: float
    tokens: int
    requests: int
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``seconds / baseline_seconds``."""
        return self.seconds / self.baseline_seconds if self.baseline_seconds > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        """The measurement as JSON."""
        return {"seconds": round(self.seconds, 4), "baseline_seconds": round(self.baseline_seconds, 4),
                "ratio": round(self.ratio, 4), "tokens": self.tokens, "requests": self.requests, **self.detail}


def _messages(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": instruction}]
    return ([{"role": "system", "content": system}] + msgs) if system else msgs


class SuiteBench:
    """Measurements on one suite's running server."""

    def __init__(self, suite: Suite, api_url: str, base_url: str, gateway_pid: int) -> None:
        self.suite = suite
        self.base_url = base_url
        self.client = load.client(api_url)
        self.pid = gateway_pid
        self._ids: dict[tuple[str, str | None, str], list[int]] = {}
        self.cpu_per_token: dict[str, list[float]] = {}

    # ---- building blocks ---------------------------------------------------------------------------

    async def role_ids(self, model: str, system: str | None, instruction: str) -> list[int]:
        """A role's prompt ids for ``instruction`` (its chat template or prompt format, its system prompt)."""
        key = (model, system, instruction)
        if key not in self._ids:
            self._ids[key] = await load.tokenize(self.base_url, model, _messages(instruction, system))
        return self._ids[key]

    async def composite(self, recipe: RecipeInfo, instruction: str, max_tokens: int, *, cpu: bool = False
                        ) -> load.Result:
        """One greedy chat request to a recipe, with its trace; ``cpu`` records the gateway's CPU per token
        (meaningful only when nothing else runs)."""
        c0 = cpu_seconds(self.pid) if cpu else 0.0
        res = await load.chat(self.client, recipe.name, _messages(instruction), max_tokens, trace=True)
        if cpu and res.tokens:
            self.cpu_per_token.setdefault(recipe.name, []).append((cpu_seconds(self.pid) - c0) / res.tokens)
        return res

    async def native(self, model: str, ids: list[int], n: int) -> float:
        """Native decoding of exactly ``n`` tokens after ``ids`` through the plain model; its wall time."""
        if n <= 0:
            return 0.0
        t0 = time.perf_counter()
        res = await load.completion(self.client, model, ids, n, extra={"ignore_eos": True})
        if res.tokens != n:
            raise RuntimeError(f"native decoding of {model} wrote {res.tokens} tokens, not {n}")
        return time.perf_counter() - t0

    async def floor(self, recipe: RecipeInfo, instruction: str, result: load.Result) -> float:
        """The floor of one composite request: the forward passes its method cannot avoid, natively."""
        t0 = time.perf_counter()
        if recipe.decoder == "nudging":
            counts = (result.trace or {}).get("role_token_counts", {})
            base_model, base_sys = recipe.roles["base"]
            al_model, al_sys = recipe.roles["aligner"]
            # the rounds alternate: the aligner's words, then the base's, never both at once
            await self.native(al_model, await self.role_ids(al_model, al_sys, instruction), counts.get("aligner", 0))
            await self.native(base_model, await self.role_ids(base_model, base_sys, instruction),
                              counts.get("base", 0))
        else:
            ids = {r: await self.role_ids(m, s, instruction) for r, (m, s) in recipe.lockstep_roles.items()}
            await asyncio.gather(*(self.native(recipe.lockstep_roles[r][0], ids[r], result.tokens) for r in ids))
        return time.perf_counter() - t0

    # ---- rows --------------------------------------------------------------------------------------

    async def warm(self, recipe: RecipeInfo) -> None:
        """One short request, so start-up costs do not land in a measurement."""
        res = await self.composite(recipe, INSTRUCTION_WARM, 24)
        await self.floor(recipe, INSTRUCTION_WARM, res)

    async def single(self, recipe: RecipeInfo, prompts: list[str], max_tokens: int, repeats: int = 1) -> Ratio:
        """One request at a time: composite then its floor, prompt by prompt, ``repeats`` times each; the
        median time of each prompt's composite requests and of its floors (gateway CPU recorded per request).

        For nudging, also the aligner's forward steps (``alignd_engine_decode_steps``: its whole blocks, of
        which the floor counts only the words it wrote) decoded natively by the aligner alone: one aligner
        sequence takes those steps one after another, so that time over the floor bounds the ratio of any
        nudging that runs each round's block in the aligner's one sequence (``aligner_steps_bound``)."""
        total = base = aligner_alone = 0.0
        tokens = aligner_steps = 0
        outputs = []
        runs: list[list[float]] = []
        aligner = recipe.roles.get("aligner") if recipe.decoder == "nudging" else None
        for p in prompts:
            times, floors, alone = [], [], []
            for _ in range(repeats):
                before = await load.decode_steps(self.base_url) if aligner else {}
                res = await self.composite(recipe, p, max_tokens, cpu=True)
                times.append(res.seconds)
                floors.append(await self.floor(recipe, p, res))
                if aligner:
                    model, system = aligner
                    steps = int((await load.decode_steps(self.base_url)).get(model, 0.0) - before.get(model, 0.0))
                    alone.append(await self.native(model, await self.role_ids(model, system, p), steps))
            total += statistics.median(times)
            base += statistics.median(floors)
            tokens += res.tokens
            outputs.append(res)
            runs.append([round(t, 3) for t in times])
            if aligner:
                aligner_steps += steps
                aligner_alone += statistics.median(alone)
        detail: dict[str, Any] = {"role_token_share": _shares(outputs), "repeats": repeats, "seconds_runs": runs}
        if aligner:
            written = sum((r.trace or {}).get("role_token_counts", {}).get("aligner", 0) for r in outputs)
            detail |= {"aligner_steps": aligner_steps, "aligner_tokens": written,
                       "aligner_steps_alone_seconds": round(aligner_alone, 4),
                       "aligner_steps_bound": round(aligner_alone / base, 4) if base > 0 else None}
        return Ratio(total, base, tokens, len(prompts), detail)

    async def concurrent(self, recipe: RecipeInfo, prompts: list[str], max_tokens: int, repeats: int = 1
                         ) -> tuple[Ratio, list[load.Result]]:
        """All prompts at once, then their floors at once, ``repeats`` times: the median wall time of the
        composite rounds against that of the floor rounds."""
        walls, floors = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(self.composite(recipe, p, max_tokens) for p in prompts))
            walls.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            await asyncio.gather(*(self.floor(recipe, p, r) for p, r in zip(prompts, results)))
            floors.append(time.perf_counter() - t1)
        detail = {"repeats": repeats, "seconds_runs": [round(w, 3) for w in walls],
                  "baseline_seconds_runs": [round(f, 3) for f in floors]}
        return (Ratio(statistics.median(walls), statistics.median(floors), sum(r.tokens for r in results),
                      len(prompts), detail), list(results))

    async def naive(self, recipe: RecipeInfo, prompts: list[str], results: list[load.Result]) -> float:
        """The naive gateway of the same recipe on the same prompts and lengths, all at once: every step
        resubmits each role's prompt plus the output so far for one token with its top-20 log-probs."""
        from bench.naive import naive_request

        t0 = time.perf_counter()
        await asyncio.gather(*(
            naive_request(self, recipe, p, r.tokens) for p, r in zip(prompts, results)
        ))
        return time.perf_counter() - t0

    async def speculative(self, plain: RecipeInfo, spec: RecipeInfo, prompts: list[str], max_tokens: int,
                          *, draft_role: str | None = None, repeats: int = 1) -> Ratio:
        """The same recipe without and with speculative draft-and-verify, prompt by prompt, ``repeats`` times
        each (median times per prompt); checks tokens.

        With ``draft_role``, also the draft's model alone decoding each answer natively: no draft-and-verify
        can be faster than its draft writing the answer alone, so time without speculation over that time
        bounds the speed-up any drafting by that role can give (``draft_alone_bound``)."""
        off = on = alone = 0.0
        same = 0
        kept = replaced = tokens = 0
        for p in prompts:
            offs, ons, alones = [], [], []
            for _ in range(repeats):
                a = await self.composite(plain, p, max_tokens)
                b = await self.composite(spec, p, max_tokens)
                offs.append(a.seconds)
                ons.append(b.seconds)
                if draft_role is not None:
                    model, system = spec.roles[draft_role]
                    alones.append(await self.native(model, await self.role_ids(model, system, p), a.tokens))
            off += statistics.median(offs)
            on += statistics.median(ons)
            alone += statistics.median(alones) if alones else 0.0
            tokens += b.tokens
            same += int(a.token_ids == b.token_ids)
            for span in (b.trace or {}).get("spans", []):
                reason = span.get("reason", "")
                kept += int("kept]" in reason)
                replaced += int("replaces" in reason)
        accept = kept / (kept + replaced) if kept + replaced else float("nan")
        # the ratio reads "speed-up": time without over time with
        detail: dict[str, Any] = {"same_tokens": f"{same}/{len(prompts)}", "draft_acceptance": round(accept, 3),
                                  "repeats": repeats}
        if draft_role is not None and alone > 0:
            detail |= {"draft_alone_seconds": round(alone, 4), "draft_alone_bound": round(off / alone, 4)}
        return Ratio(off, on, tokens, len(prompts), detail)

    async def throughput(self, client: openai.AsyncOpenAI, model: str, prompts: list[str], max_tokens: int,
                         concurrency: int) -> tuple[float, int]:
        """Tokens per second of plain completions (``ignore_eos``) with ``concurrency`` requests in flight."""
        jobs = [lambda p=p: load.completion(client, model, p, max_tokens, extra={"ignore_eos": True})
                for p in prompts]
        wall, results = await load.run_all(jobs, concurrency)
        tokens = sum(r.tokens for r in results)
        return tokens / wall, tokens

    async def soak(self, recipe: RecipeInfo, seconds: float, concurrency: int, max_tokens: int,
                   sampler: MemorySampler) -> dict[str, Any]:
        """Requests without pause for ``seconds``; the gateway's resident memory after warm-up, and its CPU
        time per token over 10-second windows."""
        stop_at = time.monotonic() + seconds
        t_start = time.monotonic()
        tokens = [0]
        windows: list[float] = []
        done = [0]

        async def worker(i: int) -> None:
            k = i
            while time.monotonic() < stop_at:
                res = await self.composite(recipe, SOAK_PROMPTS[k % len(SOAK_PROMPTS)], max_tokens)
                tokens[0] += res.tokens
                done[0] += 1
                k += concurrency

        async def cpu_windows() -> None:
            while time.monotonic() < stop_at:
                c0, n0 = cpu_seconds(self.pid), tokens[0]
                await asyncio.sleep(10)
                if tokens[0] > n0:
                    windows.append((cpu_seconds(self.pid) - c0) / (tokens[0] - n0))

        await asyncio.gather(cpu_windows(), *(worker(i) for i in range(concurrency)))
        warm = t_start + max(20.0, 0.2 * seconds)
        post = [rss for t, rss in sampler.root_rss if warm <= t <= time.monotonic()]
        if len(post) < 4:
            return {"error": "too few samples after warm-up"}
        head = post[: max(2, len(post) // 10)]
        base = statistics.median(head)
        return {
            "seconds": round(seconds, 1), "requests": done[0], "tokens": tokens[0],
            "rss_after_warmup_mib": round(base / 2**20, 1),
            "rss_peak_after_warmup_mib": round(max(post) / 2**20, 1),
            "rss_end_mib": round(statistics.median(post[-max(2, len(post) // 10):]) / 2**20, 1),
            "growth": round(max(post) / base - 1, 4),
            "cpu_ms_per_token_windows": [round(w * 1000, 3) for w in windows],
        }

    async def close(self) -> None:
        """Close the HTTP client."""
        await self.client.close()


def _shares(results: list[load.Result]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for r in results:
        for role, c in ((r.trace or {}).get("role_token_counts") or {}).items():
            counts[role] = counts.get(role, 0) + c
    total = sum(counts.values()) or 1
    return {role: round(c / total, 3) for role, c in counts.items()}


INSTRUCTION_WARM = "Say hello and tell me one thing about the weather."
SOAK_PROMPTS = [
    "Name a fruit and describe its taste.",
    "What does a librarian do?",
    "Give one tip for sleeping better.",
    "Explain what a rainbow is.",
]

